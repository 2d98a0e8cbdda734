"""Bad model inputs end in one clear message (path, flag or key, fix) at every entry point, before
Ray, vLLM or DeepSpeed start; a finished run is not silently "resumed"; tied weights stay tied."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from distil.model_check import FETCH, ModelInputError, check_model_dir, gguf_problem

CONFIG = "launch/configs/tiny_cpu.yaml"


def copy_model(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def error_of(path, **kwargs) -> str:
    with pytest.raises(ModelInputError) as info:
        check_model_dir(path, "student", "model.name_or_path", **kwargs)
    return str(info.value)


def write_gguf(path: Path, values: list[float]) -> Path:
    """A minimal valid GGUF v3: one string key, one F32 tensor, data at the 32-byte aligned offset."""
    def string(s: bytes) -> bytes:
        return struct.pack("<Q", len(s)) + s

    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 1)
    header += string(b"general.architecture") + struct.pack("<I", 8) + string(b"llama")
    header += string(b"w") + struct.pack("<IQIQ", 1, len(values), 0, 0)  # 1 dim, F32 (type 0), offset 0
    header += b"\0" * (-len(header) % 32)
    path.write_bytes(header + struct.pack(f"<{len(values)}f", *values))
    return path


def test_a_good_model_folder_passes(tiny_model):
    assert check_model_dir(tiny_model, "student", "model.name_or_path") is None


def test_missing_path(tmp_path):
    assert error_of(tmp_path / "nope") == (
        f"model.name_or_path={tmp_path / 'nope'} (student): no such file or folder; pass a Hugging Face model "
        "folder (config.json, weights, tokenizer with a chat template), e.g. <train.output_dir>/hf written by "
        f"launch/train.py, or fetch one: {FETCH}")


def test_hub_name_not_in_the_cache_while_offline(monkeypatch):
    monkeypatch.setattr("huggingface_hub.is_offline_mode", lambda: True)
    message = error_of("nobody-here/no-such-model")
    assert "no hub model of that name in the local Hugging Face cache" in message
    assert message.endswith("hf download nobody-here/no-such-model")


def test_folder_without_config_json(tmp_path):
    assert error_of(tmp_path) == (
        f"model.name_or_path={tmp_path} (student): the folder has no config.json, so it is not a Hugging Face "
        "model folder; point model.name_or_path at the folder that holds config.json, the weights and the tokenizer")


def test_a_file_is_not_a_model_folder(tiny_model):
    assert "a file, not a model folder" in error_of(tiny_model / "config.json")


def test_folder_without_weights(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)
    (model / "model.safetensors").unlink()
    assert "config.json but no weights (*.safetensors or *.bin)" in error_of(model)
    assert check_model_dir(model, "checkpoint to export", "--checkpoint", weights=False) is None


def test_tokenizer_without_chat_template(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)
    (model / "chat_template.jinja").unlink()
    assert ": the tokenizer has no chat template (no chat_template.jinja" in error_of(model)


def test_tokenizer_larger_than_the_embeddings(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 2000  # the tokenizer has 2048 tokens
    (model / "config.json").write_text(json.dumps(config))
    assert error_of(model) == (
        f"model.name_or_path={model} (student): the tokenizer has 2048 tokens but config.json says vocab_size "
        "2000, so token ids >= 2000 have no embedding row; use the tokenizer saved with this model")


def test_chat_template_role_token_the_tokenizer_lacks(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)
    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|turn|>"))
    assert "the chat template writes ['<|turn|>'], which the tokenizer does not have as tokens" in error_of(model)


def test_chat_template_without_end_of_turn_token(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path)
    template = model / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_end|>", "END"))
    assert error_of(model).endswith(
        "unusable chat template: the chat template's assistant turn has no end-of-turn special token")


def test_gguf_missing_corrupt_and_complete(tmp_path):
    good = write_gguf(tmp_path / "good.gguf", [1.0, 2.0, 3.0, 4.0])
    assert gguf_problem(good) is None
    gguf = pytest.importorskip("gguf")  # cross-check the header walk with the reference reader
    assert gguf.GGUFReader(str(good)).tensors[0].data.tolist() == [1.0, 2.0, 3.0, 4.0]

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-4])
    size = good.stat().st_size
    assert gguf_problem(cut) == f"it is cut short: {size - 4} bytes, its header describes {size}"
    (tmp_path / "html.gguf").write_bytes(b"<html>404</html>")
    assert gguf_problem(tmp_path / "html.gguf") == "no GGUF magic in its first 4 bytes, file of 16 bytes"
    (tmp_path / "header.gguf").write_bytes(good.read_bytes()[:40])
    assert gguf_problem(tmp_path / "header.gguf") == "its header is cut off or garbled"

    assert error_of(tmp_path / "gone.gguf").startswith(
        f"model.name_or_path={tmp_path / 'gone.gguf'} (student): GGUF file {tmp_path / 'gone.gguf'} not found")
    message = error_of(cut)
    assert f"{cut} is not a valid GGUF file (it is cut short" in message and message.endswith(f"then run {FETCH}")
    assert error_of(good).endswith(f"convert it with {FETCH} and pass the folder it prints")


def test_folder_holding_a_corrupt_gguf_names_the_file(tmp_path):
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"GGUF" + b"\0" * 8)
    message = error_of(tmp_path)
    assert f"{tmp_path / 'model.Q4_1.gguf'} is not a valid GGUF file (its header is cut off or garbled)" in message


def test_the_packaged_gguf_is_complete_and_a_cut_copy_is_not(tmp_path):
    from distil.real_model import packaged_gguf

    real = packaged_gguf()
    assert gguf_problem(real) is None
    cut = tmp_path / real.name
    cut.write_bytes(real.read_bytes()[:-1])
    size = real.stat().st_size
    assert gguf_problem(cut) == f"it is cut short: {size - 1} bytes, its header describes {size}"


# --- every entry point: exit status 2, the message on stderr, nothing heavy started --------------------------


def test_evaluate_names_the_missing_model(capsys):
    from launch import evaluate

    assert evaluate.main(["--config", CONFIG, "--models", "x=/nonexistent"]) == 2
    assert capsys.readouterr().err == (
        "error: --models x=/nonexistent (model x): no such file or folder; pass a Hugging Face model folder "
        "(config.json, weights, tokenizer with a chat template), e.g. <train.output_dir>/hf written by "
        f"launch/train.py, or fetch one: {FETCH}\n")


def test_evaluate_checks_every_model_before_generating(tiny_model, tmp_path, capsys):
    from launch import evaluate

    assert evaluate.main(["--config", CONFIG, "--models", f"base={tiny_model}", f"student={tmp_path}",
                          f"eval.output_dir={tmp_path / 'eval'}"]) == 2
    err = capsys.readouterr().err
    assert f"error: --models student={tmp_path} (model student): the folder has no config.json" in err
    assert not (tmp_path / "eval").exists()


def test_train_checks_the_student_before_deepspeed(monkeypatch, tmp_path, capsys):
    import sys

    from launch import train

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    assert train.main(["--config", CONFIG, f"model.name_or_path={tmp_path / 'student'}"]) == 2
    assert f"error: model.name_or_path={tmp_path / 'student'} (student): no such file" in capsys.readouterr().err
    assert "deepspeed" not in sys.modules


def test_annotate_checks_the_teacher_before_ray(tiny_model, tmp_path, capsys):
    from launch import annotate

    model = copy_model(tiny_model, tmp_path)
    (model / "chat_template.jinja").unlink()
    assert annotate.main(["--config", CONFIG, f"teacher.model={model}"]) == 2
    assert f"error: teacher.model={model} (teacher): the tokenizer has no chat template" in capsys.readouterr().err


def test_export_checks_the_checkpoint_tokenizer(tiny_model, tmp_path, capsys):
    from launch import export

    checkpoint = copy_model(tiny_model, tmp_path)
    (checkpoint / "latest").write_text("global_step4")
    (checkpoint / "model.safetensors").unlink()  # ZeRO-3 keeps its weights in global_step4/, not checked here
    (checkpoint / "chat_template.jinja").unlink()
    assert export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 2
    assert (f"error: --checkpoint={checkpoint} (checkpoint to export): the tokenizer has no chat template"
            in capsys.readouterr().err)
    assert export.main(["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    assert "not a complete training checkpoint (needs 'latest' and config.json)" in capsys.readouterr().err


# --- a finished run is refused, not silently resumed ---------------------------------------------------------


def test_finished_run_message(tmp_path):
    from distil.checkpoints import finished_run_message
    from distil.config import TrainConfig

    checkpoint = tmp_path / "checkpoint-40"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 40, "max_steps": 40}))
    train = TrainConfig(output_dir=str(tmp_path), num_epochs=6)
    assert finished_run_message(checkpoint, 40, train) is None  # stopped at its last step: the export is left
    assert finished_run_message(checkpoint, 40, TrainConfig(output_dir=str(tmp_path), export=False)) is not None
    (tmp_path / "hf").mkdir()
    assert finished_run_message(checkpoint, 41, train) is None  # a step left
    assert finished_run_message(checkpoint, 40, train) == (
        f"train.output_dir={tmp_path} holds a finished run: checkpoint-40 already reached the 40 optimizer steps this "
        "config plans (train.num_epochs=6, train.max_steps=-1), so resuming it would train nothing. To train "
        "again, use a new train.output_dir (or delete this one); to train this run further, raise "
        "train.num_epochs or train.max_steps; to export it again, delete its hf/ folder and rerun")


# --- tied embeddings stay tied in the saved model -----------------------------------------------------------


def test_trainer_save_drops_the_gathered_copy_of_tied_weights(tiny_model, tmp_path):
    """Under ZeRO 0-2 save_model gets a state dict of clones: lm_head.weight is a copy of the embeddings."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, TrainingArguments

    from distil.trainer import DistilTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in gathered
    model.save_pretrained(tmp_path / "plain", state_dict=gathered)  # what the stock Trainer writes
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()

    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[])
    trainer = DistilTrainer(model=model, args=args, gamma=1.0, lm_head_chunk_tokens=64)
    trainer._save(str(tmp_path / "hf"), state_dict=gathered)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    embeddings_bytes = model.model.embed_tokens.weight.numel() * 4
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("plain", "hf")}
    assert 0 <= size["plain"] - size["hf"] - embeddings_bytes < 200  # one fp32 embedding matrix less (+ header)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([list(range(5, 40))])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_untied_weights_are_all_kept():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distil.checkpoints import without_tied_copies

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False))
    state = model.state_dict()
    assert without_tied_copies(state, model).keys() == state.keys()
