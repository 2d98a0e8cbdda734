"""Combining several teachers (distil/combine.py) against hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distil.combine import MISSING_ID, Answer, mix_topk, rouge_l, select


def answers(*rows) -> list[Answer]:
    return [Answer(name, text, weight, grounding, order) for order, (name, text, weight, grounding) in enumerate(rows)]


def test_each_keeps_every_answer_with_its_teacher_s_share_of_the_weight():
    chosen = select("each", answers(("a", "x", 2.0, 0.5), ("b", "y", 1.0, 0.9), ("c", "z", 1.0, None)))
    assert [(c.teacher, c.weight) for c in chosen] == [("a", 0.5), ("b", 0.25), ("c", 0.25)]
    # a report only two teachers answered weighs as much as one all three answered
    chosen = select("each", answers(("a", "x", 2.0, 0.5), ("c", "z", 1.0, None)))
    assert [(c.teacher, c.weight) for c in chosen] == [("a", pytest.approx(2 / 3)), ("c", pytest.approx(1 / 3))]
    assert select("each", []) == []


def test_best_grounded_takes_the_best_supported_answer_then_the_heavier_then_the_first_teacher():
    assert [c.teacher for c in select("best_grounded", answers(("a", "x", 1.0, 0.5), ("b", "y", 1.0, 0.9)))] == ["b"]
    # nothing to check (no number, unit, date or drug) counts as fully grounded
    assert select("best_grounded", answers(("a", "x", 1.0, 0.9), ("b", "y", 1.0, None)))[0].teacher == "b"
    assert select("best_grounded", answers(("a", "x", 1.0, 0.7), ("b", "y", 3.0, 0.7)))[0].teacher == "b"
    chosen = select("best_grounded", answers(("a", "x", 1.0, 0.7), ("b", "y", 1.0, 0.7)))
    assert [(c.teacher, c.weight) for c in chosen] == [("a", 1.0)]


def test_rouge_l_of_two_texts_by_hand():
    # LCS of "the fever rose" / "the fever fell" = 2 words: P = R = 2/3, F = 2/3
    assert rouge_l("The fever rose", "the fever fell") == pytest.approx(2 / 3)
    assert rouge_l("fièvre élevée", "Fièvre élevée") == 1.0  # accents are word characters
    assert rouge_l("a b c d", "x y") == 0.0


def test_consensus_is_the_answer_closest_to_the_others():
    texts = (("a", "fever cough rash", 1.0, None), ("b", "fever cough", 1.0, None), ("c", "headache", 1.0, None))
    # ROUGE-L F: a~b = 2*(2/3*1)/(2/3+1) = 0.8, a~c = 0, b~c = 0 -> a: 0.4, b: 0.4, c: 0 -> tie a/b: first, a
    assert select("consensus", answers(*texts))[0].teacher == "a"
    # weights in the mean: with w_c = 0.5, w_a = 2: a -> (1*0.8 + .5*0)/1.5, b -> (2*0.8 + .5*0)/2.5 = 0.64 > 0.533
    weighted = answers(("a", "fever cough rash", 2.0, None), ("b", "fever cough", 1.0, None), ("c", "headache", 0.5, None))
    assert select("consensus", weighted)[0].teacher == "b"
    # two teachers agree with each other alike: the heavier one wins
    assert select("consensus", answers(("a", "x y", 1.0, None), ("b", "x z", 2.0, None)))[0].teacher == "b"
    with pytest.raises(ValueError, match="unknown text rule 'vote'"):
        select("vote", answers(("a", "x", 1.0, None)))


def lp(*p):
    return np.log(np.array([p], dtype=np.float64))


def test_mixture_of_two_teachers_over_the_union_of_their_top_k_by_hand():
    # one answer token; teacher A top-2: id 5 -> 0.6, id 7 -> 0.3 (rest 0.1); teacher B top-2: id 7 -> 0.5,
    # id 9 -> 0.2 (rest 0.3); weights 3:1 -> 0.75, 0.25
    a = (np.array([[5, 7]]), lp(0.6, 0.3))
    b = (np.array([[7, 9]]), lp(0.5, 0.2))
    ids, log_probs = mix_topk([a, b], [3.0, 1.0])
    p = np.exp(log_probs)
    # id 5: .75*.6 = .45; id 7: .75*.3 + .25*.5 = .35; id 9: .25*.2 = .05; rest: .75*.1 + .25*.3 = .15
    assert ids.tolist() == [[5, 7, 9, MISSING_ID]]
    assert p[0, :3] == pytest.approx([0.45, 0.35, 0.05]) and p[0, 3] == 0.0
    assert 1 - p.sum() == pytest.approx(0.15)
    assert p.sum() + (0.75 * 0.1 + 0.25 * 0.3) == pytest.approx(1.0)  # top-k part and rest bucket sum to 1


def test_mixture_rows_sum_to_one_with_the_rest_and_one_teacher_comes_back_unchanged():
    rng = np.random.default_rng(0)
    tables = []
    for k in (4, 6, 3):
        ids = np.stack([rng.choice(20, size=k, replace=False) for _ in range(5)])
        probs = rng.dirichlet(np.ones(k + 1), size=5)[:, :k]  # the (k+1)-th share is the teacher's rest
        ids[0, 0] = MISSING_ID  # a column the student's vocabulary lacks: no mass there
        tables.append((ids, np.log(probs)))
    weights = [1.0, 2.0, 0.5]
    ids, log_probs = mix_topk(tables, weights)
    assert ids.shape == (5, 13)
    w = np.array(weights) / sum(weights)
    rest = sum(wt * (1 - np.exp(t[1]).sum(1) + np.where(t[0] == MISSING_ID, np.exp(t[1]), 0).sum(1))
               for wt, t in zip(w, tables))
    assert np.exp(log_probs).sum(1) + rest == pytest.approx(np.ones(5))
    assert all(len(set(row[row != MISSING_ID])) == (row != MISSING_ID).sum() for row in ids)  # each id once
    single_ids, single_lp = mix_topk([tables[1]], [7.0])
    for row in range(5):  # the same pairs, most probable first, the missing column emptied at the end
        pairs = sorted(((i, p) for i, p in zip(*[t[row] for t in tables[1]]) if i != MISSING_ID), key=lambda x: -x[1])
        assert single_ids[row, :len(pairs)].tolist() == [i for i, _ in pairs]
        assert single_lp[row, :len(pairs)] == pytest.approx([p for _, p in pairs])
        assert (single_ids[row, len(pairs):] == MISSING_ID).all() and np.isinf(single_lp[row, len(pairs):]).all()
    assert single_ids.shape == (5, 6) and (single_ids[0] == MISSING_ID).sum() == 1


# ---------------------------------------------------------------------------------------------
# Stage 2 with several teachers: the weighted loss, the ledger's answers combined, the store's mixture.


def test_weighted_examples_give_each_kind_its_weighted_mean_over_the_step():
    import torch

    from distil.loss import EXTRACT, SUMMARIZE, distil_loss, kind_weights, step_loss, task_token_counts

    ce = torch.tensor([1.0, 3.0, 2.0, 6.0])
    task = torch.tensor([SUMMARIZE, SUMMARIZE, EXTRACT, EXTRACT])
    w = torch.tensor([1.0, 1.0, 0.75, 0.25])  # two teachers' extraction answers, 3:1
    counts = task_token_counts(torch.tensor([5, 5, 5, 5]), task, w)
    assert counts.tolist() == [2.0, 1.0, 0.0, 0.0, 0.0]
    loss, parts = step_loss(ce, None, task, kind_weights(0.8), 0.0, counts, world_size=1, token_weights=w)
    # L_sum = 2, L_ext = (0.75*2 + 0.25*6) / 1 = 3; L = 0.8*2 + 0.2*3 = 2.2
    assert loss.item() == pytest.approx(2.2) and parts[:3].tolist() == [4.0, 3.0, 0.0]
    # a weighted count below 1 is a real denominator, not clamped to 1
    half, _ = distil_loss(torch.tensor([4.0]), torch.tensor([EXTRACT]) * 1, kind_weights(0.0),
                          torch.tensor([0.0, 0.5, 0.0, 0.0, 0.0]))
    assert half.item() == pytest.approx(8.0)


def write_ledger(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_several_teachers_answers_become_weighted_examples_by_rule(tmp_path, caplog):
    from distil.data import DataError, combined_answers, training_examples
    from distil.teacher_config import Teacher, TeacherConfig, annotation_key

    a = Teacher("a", 3.0, TeacherConfig(model="teacher-a"), 0)
    b = Teacher("b", 1.0, TeacherConfig(model="teacher-b"), 1)
    c = Teacher("c", 1.0, TeacherConfig(model="teacher-c"), 2)  # never ran: costs only its own answers
    ka, kb = annotation_key(a.config), annotation_key(b.config)
    ledger = tmp_path / "key_info.jsonl"
    write_ledger(ledger, [
        {"id": "r1", "key_info": "fever 39 C", "status": "ok", "grounding": 1.0, **ka},
        {"id": "r1", "key_info": "fever 41 C", "status": "ok", "grounding": 0.5, **kb},
        {"id": "r2", "key_info": "cut", "status": "truncated", "grounding": None, **ka},
        {"id": "r2", "key_info": "rash", "status": "ok", "grounding": None, **kb}])
    each = combined_answers(ledger, [a, b, c], "each")
    assert "no usable answer of teacher(s) ['c']" in caplog.text
    assert [(x.text, x.weight) for x in each["r1"]] == [("fever 39 C", 0.75), ("fever 41 C", 0.25)]
    assert [(x.text, x.weight) for x in each["r2"]] == [("rash", 1.0)]  # the only usable answer
    assert [x.text for x in combined_answers(ledger, [a, b], "best_grounded")["r1"]] == ["fever 39 C"]
    records = [{"id": i, "lang": "en", "report": "report " + i, "summary": "gold " + i} for i in ("r1", "r2", "r3")]
    examples, counts = training_examples(records, each, gamma=0.8)
    extract = [(e["id"], e["answer"], e["weight"], e["teacher"]) for e in examples if e["task"] == "extract"]
    assert extract == [("r1", "fever 39 C", 0.75, ka["teacher"]), ("r1", "fever 41 C", 0.25, kb["teacher"]),
                       ("r2", "rash", 1.0, kb["teacher"])]
    assert counts["missing_key_info"] == 1 and counts["extract"] == 3
    with pytest.raises(DataError, match="no record of teacher 'teacher-c'"):
        combined_answers(ledger, [c, Teacher("d", 1.0, TeacherConfig(model="teacher-d"), 3)], "each")


def test_the_store_serves_an_answer_s_author_and_mixes_the_teachers_on_a_gold_summary(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from distil.packing import collate_packed
    from distil.teacher_topk import MixedEntry, TopkEntry, TopkStore, sequence_fingerprint, tokenizer_fingerprint
    from distil.tokenization import encode_example
    from teacher_serving.topk import ScoreJob, TopkWriter

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    report = {"id": "r1", "lang": "en", "report": "Fever and cough for two days."}
    gold = encode_example(tokenizer, {**report, "task": "summarize", "answer": "Fever."}, 256)
    key_info = encode_example(tokenizer, {**report, "task": "extract", "answer": "fever"}, 256)
    n = sum(t != -100 for t in gold["labels"])
    folder = tmp_path / "k.topk"
    for teacher, p, k in (("A", 0.6, 2), ("B", 0.2, 3)):  # both score the gold summary; only A wrote key info
        writer = TopkWriter(folder, tokenizer_fingerprint(tokenizer),
                            {"teacher": teacher, "prompt_version": "v1", "sampling": {"topk": k}})
        job = ScoreJob({"id": "r1"}, {})
        arrays = {"summarize": (np.tile(np.arange(k) + 10, (n, 1)), np.log(np.full((n, k), p / k)))}
        job.fingerprints["summarize"] = sequence_fingerprint(gold["input_ids"])
        if teacher == "A":
            m = sum(t != -100 for t in key_info["labels"])
            arrays["extract"] = (np.tile(np.arange(k) + 20, (m, 1)), np.log(np.full((m, k), 0.3)))
            job.fingerprints["extract"] = sequence_fingerprint(key_info["input_ids"])
        writer.append([(job, arrays)])
        writer.close()
    store = TopkStore(folder, teachers={"A": 3.0, "B": 1.0})
    mixed = store.lookup(gold)
    assert isinstance(mixed, MixedEntry) and mixed.k == 5 and mixed.weights == (3.0, 1.0)
    ids, log_probs = mixed.read()
    # ids 10, 11: 0.75 * 0.3 + 0.25 * 0.2/3 each; id 12: 0.25 * 0.2/3; rest = 0.75 * 0.4 + 0.25 * 0.8
    assert ids[0].tolist() == [10, 11, 12, -1, -1]
    fp16 = 2e-3  # the store keeps log-probs in fp16
    assert np.exp(log_probs[0, :3]) == pytest.approx([0.225 + 0.05 / 3, 0.225 + 0.05 / 3, 0.05 / 3], rel=fp16)
    assert 1 - np.exp(log_probs[0]).sum() == pytest.approx(0.75 * 0.4 + 0.25 * 0.8, rel=fp16)
    authored = store.lookup(dict(key_info, teacher="A"))
    assert isinstance(authored, TopkEntry) and authored.k == 2
    assert store.lookup(dict(key_info, teacher="B")) is None  # B never scored A's answer
    assert TopkStore(folder, teachers={"B": 1.0}).lookup(gold).k == 3  # a run with teacher B alone
    # one batch holds a 5-wide mixture and a 2-wide table: the narrower is padded with empty columns
    batch = collate_packed([[dict(gold, teacher_topk=mixed), dict(key_info, teacher="A", teacher_topk=authored)]])
    assert batch["teacher_ids"].shape[-1] == 5 and (batch["teacher_ids"][0, n:, 2:] == -1).all()
