"""The two role-based prompts of distil-tuning, in the report's own language.

Both tasks share the user turn (the report); only the system instruction differs:
  summarization: (S: P_sum, U: report, A: gold summary)
  extraction:    (S: P_ext, U: report, A: teacher key information)
A third kind of training example reuses the summarization prompt with the teacher's answer:
  teacher_summary: (S: P_sum, U: report without a gold summary, A: teacher summary)
and on-policy distillation (distil/onpolicy.py) two more, the student's own sampled answers to either prompt,
graded token by token by the teacher (no gold answer, no cross-entropy):
  student_summary: (S: P_sum, U: report, A: the student's sample)
  student_extract: (S: P_ext, U: report, A: the student's sample)
Stage 1 sends the extraction prompt (and, with teacher.summarize, P_sum for the reports without a
gold summary) to the teacher; Stage 2 trains on all three kinds, each with its own weight and loss;
evaluation uses P_sum. Bump PROMPT_VERSION whenever a text changes: the Stage 1 ledger keys records by it.
"""

from __future__ import annotations

PROMPT_VERSION = "v1"

TASKS = ("summarize", "extract", "teacher_summary", "student_summary", "student_extract")  # the kinds of example
TASK_IDS = {task: i for i, task in enumerate(TASKS)}  # the task id of every token in a packed row

SYSTEM_PROMPTS: dict[str, dict[str, str]] = {
    "summarize": {
        "en": "Summarize clinical text",
        "es": "Resume el texto clínico",
        "fr": "Résume le texte clinique",
        "pt": "Resuma o texto clínico",
    },
    "extract": {
        "en": "Extract the key information from clinical text",
        "es": "Extrae la información clave del texto clínico",
        "fr": "Extrais les informations clés du texte clinique",
        "pt": "Extraia as informações-chave do texto clínico",
    },
}
SYSTEM_PROMPTS["teacher_summary"] = SYSTEM_PROMPTS["summarize"]  # the same question; the teacher answers it
SYSTEM_PROMPTS["student_summary"] = SYSTEM_PROMPTS["summarize"]  # the same questions; the student answers them
SYSTEM_PROMPTS["student_extract"] = SYSTEM_PROMPTS["extract"]
STUDENT_KIND = {"summarize": "student_summary", "extract": "student_extract"}  # a prompt -> its on-policy kind


def build_messages(task: str, lang: str, report: str, answer: str | None = None) -> list[dict[str, str]]:
    """Chat messages for one example; `answer` is the assistant turn (omitted for generation)."""
    if task not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if lang not in SYSTEM_PROMPTS[task]:
        raise ValueError(f"unknown language {lang!r}; expected one of {sorted(SYSTEM_PROMPTS[task])}")
    messages = [
        {"role": "system", "content": SYSTEM_PROMPTS[task][lang]},
        {"role": "user", "content": report},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages
