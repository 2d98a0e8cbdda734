"""Chat-template rendering and assistant-only labels for one training example.

The prompt (system + user + assistant header) is rendered with the tokenizer's own chat
template; the label mask covers the answer from its first token through the end-of-turn token
(the paper's sum from i_start). A too-long example loses the end of its report, never any of
its answer.
"""

from __future__ import annotations

from distil.prompts import build_messages

IGNORE = -100


def render_prompt(tokenizer, task: str, lang: str, report: str) -> str:
    """The prompt text up to and including the assistant header (what generation starts from)."""
    return tokenizer.apply_chat_template(
        build_messages(task, lang, report.strip()), tokenize=False, add_generation_prompt=True
    )


def answer_ids(tokenizer, task: str, lang: str, answer: str) -> list[int]:
    """Token ids of the assistant turn's body: answer + end-of-turn token, as the template renders it."""
    probe = "x"
    prompt = render_prompt(tokenizer, task, lang, probe)
    full = tokenizer.apply_chat_template(build_messages(task, lang, probe, answer.strip()), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation; "
                         "use a template whose assistant turn follows the generation prompt")
    ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    end = next((i for i, t in enumerate(ids) if t in special), None)
    if end is None:
        raise ValueError("the chat template's assistant turn has no end-of-turn special token")
    return ids[: end + 1]


def answer_length(labels: list[int]) -> int:
    """Tokens of an encoded example that carry a label: its answer through end-of-turn."""
    return sum(label != IGNORE for label in labels)


def assistant_labels(prompt_len: int, answer_ids: list[int]) -> list[int]:
    """IGNORE over the prompt, the token ids over the answer (through end-of-turn)."""
    return [IGNORE] * prompt_len + list(answer_ids)


def prompt_ids_within(tokenizer, task: str, lang: str, report: str, budget: int) -> tuple[list[int], bool]:
    """Prompt ids no longer than `budget`, cutting the report's tail when needed."""
    report, cut = report_within(tokenizer, task, lang, report, budget)
    return tokenizer(render_prompt(tokenizer, task, lang, report), add_special_tokens=False)["input_ids"], cut


def report_within(tokenizer, task: str, lang: str, report: str, budget: int) -> tuple[str, bool]:
    """The report, its tail cut when needed so that its prompt takes at most `budget` tokens; whether it was cut."""
    ids = tokenizer(render_prompt(tokenizer, task, lang, report), add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return report, False
    report = report.strip()
    offsets = tokenizer(report, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    keep = len(offsets) - (len(ids) - budget)
    while keep > 0:
        cut = offsets[keep][0] if keep < len(offsets) else len(report)
        ids = tokenizer(render_prompt(tokenizer, task, lang, report[:cut]), add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return report[:cut], True
        keep -= len(ids) - budget  # token boundaries may shift by a token or two at the cut
    raise ValueError("prompt without any report is longer than its budget")


def encode_example(tokenizer, example: dict, max_length: int) -> dict | None:
    """input_ids + labels for one (task, report, answer); None when the answer alone cannot fit."""
    answer = answer_ids(tokenizer, example["task"], example["lang"], example["answer"])
    budget = max_length - len(answer)
    empty_prompt = tokenizer(render_prompt(tokenizer, example["task"], example["lang"], ""),
                             add_special_tokens=False)["input_ids"]
    if budget <= len(empty_prompt):
        return None
    prompt_ids, truncated = prompt_ids_within(tokenizer, example["task"], example["lang"], example["report"], budget)
    return {
        "id": example["id"],
        "task": example["task"],
        **{key: example[key] for key in ("weight", "teacher") if key in example},
        "input_ids": prompt_ids + answer,
        "labels": assistant_labels(len(prompt_ids), answer),
        "truncated": truncated,
    }
