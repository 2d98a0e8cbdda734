"""The planner's arithmetic: parameter counts against transformers, model states against DeepSpeed's
own estimators, activations against the tensors a real Qwen2 saves, the rest by hand."""

from __future__ import annotations

import pytest
import torch

from distil.architecture import Architecture, bundled_models, load_architecture
from distil.plan import (GiB, activation_bytes, buffer_bytes, kv_bytes_per_token, layer_activation_bytes_per_token,
                         logits_bytes, model_states, parameter_counts, plan_student, plan_teacher)

# published sizes: 0.49B, 1.54B, 3.09B, 7.61B, 72.7B
PUBLISHED = {"Qwen2.5-0.5B": 494_032_768, "Qwen2.5-1.5B": 1_543_714_304, "Qwen2.5-3B": 3_085_938_688,
             "Qwen2.5-7B": 7_615_616_512, "Qwen2.5-72B": 72_706_203_648}


def test_all_five_qwen_configs_are_bundled():
    assert set(bundled_models()) == set(PUBLISHED)
    a = load_architecture("Qwen/Qwen2.5-7B-Instruct")
    assert (a.hidden_size, a.intermediate_size, a.num_layers, a.num_heads, a.num_kv_heads) == (3584, 18944, 28, 28, 4)
    assert not a.tie_word_embeddings and load_architecture("Qwen2.5-0.5B").tie_word_embeddings


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_transformers(name):
    """Build the real model on the meta device (no memory) and count its parameters and its largest
    module the way DeepSpeed's estimate_zero3_model_states_mem_needs_all_live does."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from distil.architecture import MODELS_DIR

    config = AutoConfig.from_pretrained(MODELS_DIR / name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total, largest = parameter_counts(load_architecture(name))
    assert total == sum(p.numel() for p in model.parameters()) == PUBLISHED[name]
    assert largest == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("nodes,gpus", [(1, 8), (2, 8), (4, 8), (1, 4)])
def test_model_states_agree_with_deepspeeds_estimators(name, nodes, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = parameter_counts(load_architecture(name))
    _, ds_zero2 = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)
    _, ds_zero3, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=False)
    ds_cpu, ds_offload, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=True,
                                                                  cpu_offload_params=True)
    ours = {s: model_states(total, largest, s, gpus, nodes) for s in ("zero2", "zero3", "zero3_offload")}
    assert ours["zero2"].gpu_bytes == pytest.approx(ds_zero2, rel=0.05)
    assert ours["zero3"].gpu_bytes == pytest.approx(ds_zero3, rel=0.05)
    assert ours["zero3_offload"].gpu_bytes == pytest.approx(ds_offload, rel=0.05)
    assert ours["zero3_offload"].cpu_bytes == pytest.approx(ds_cpu, rel=0.05)


def test_model_states_by_hand():
    # 1000 params, largest 100, 2 x 4 GPUs: ZeRO-2 2*1000 + 18*1000/8; ZeRO-3 4*100 + 18*1000/8
    assert model_states(1000, 100, "zero2", 4, 2).gpu_bytes == 2000 + 2250
    assert model_states(1000, 100, "zero3", 4, 2).gpu_bytes == 400 + 2250
    offload = model_states(1000, 100, "zero3_offload", 4, 2)
    assert (offload.gpu_bytes, offload.cpu_bytes) == (400, 1.5 * 18 * 1000 / 2)


TINY = Architecture("tiny", hidden_size=4, intermediate_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
                    vocab_size=16, tie_word_embeddings=True, max_position_embeddings=64)


def test_activations_by_hand():
    # per layer and token: norms 2*(4*4 + 4 + 2*4 + 2*4) = 72, attention 2*(2*4 + 2*2) + 4*2 = 32,
    # mlp 4*2*8 = 64 -> 168. Outside: ids 8, cos+sin 2*2*2 = 8, final norm 4*4 + 4 + 2*4 = 28 -> 44.
    assert layer_activation_bytes_per_token(TINY) == 168
    assert activation_bytes(TINY, 10, checkpointing=False) == 10 * (2 * 168 + 44)
    assert activation_bytes(TINY, 10, checkpointing=True) == 10 * (2 * 2 * 4 + 168 + 44)


def test_activations_match_what_a_real_qwen2_saves_for_backward():
    """Sum the distinct storages autograd saves in a bf16 forward of a small Qwen2 (sdpa)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    tokens = 512
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, 512, (1, tokens)), use_cache=False)
    arch = Architecture("small", 256, 768, 2, 4, 2, 512, True, 32768)
    assert sum(saved.values()) == pytest.approx(activation_bytes(arch, tokens, checkpointing=False), rel=0.02)


def test_logits_and_buffers_by_hand():
    # 100 labelled tokens, vocab 16, chunk 32: 2*2*100*16 bf16 logits + grads, 2*4*32*16 fp32 chunk
    assert logits_bytes(TINY, 100, 32) == 6400 + 4096
    zero2 = {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": "auto", "allgather_bucket_size": 5e8}}
    assert buffer_bytes(TINY, "zero2", zero2) == int(4.5 * 2 * (16 + 5e8))
    zero3 = {"zero_optimization": {"reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto"}}
    assert buffer_bytes(TINY, "zero3", zero3) == int(2 * (16 + 0.9 * 16))


def test_7b_at_16k_on_two_nodes_needs_checkpointing_and_fits_zero2():
    plan = plan_student(load_architecture("Qwen2.5-7B"), 16384, nodes=2, gpus_per_node=8, gpu_memory_gib=80)
    no_ckpt = plan.options[0]
    assert (no_ckpt.strategy, no_ckpt.checkpointing, no_ckpt.fits) == ("zero2", False, False)
    assert (plan.recommended.strategy, plan.recommended.checkpointing) == ("zero2", True)
    assert plan.labelled_tokens == 4096


def test_nothing_fits_is_reported_not_hidden():
    plan = plan_student(load_architecture("Qwen2.5-72B"), 32768, nodes=1, gpus_per_node=1, gpu_memory_gib=24)
    assert plan.recommended is None


def test_teacher_72b_on_80gb_gpus_by_hand():
    a = load_architecture("Qwen2.5-72B")
    assert kv_bytes_per_token(a) == 2 * 80 * 8 * 128 * 2  # K and V, 80 layers, 8 KV heads of 128, bf16
    plan = plan_teacher(a, 32768, nodes=2, gpus_per_node=8, gpu_memory_gib=80)
    by_tp = {o.tensor_parallel_size: o for o in plan.options}
    assert sorted(by_tp) == [1, 2, 4, 8]
    assert by_tp[1].sequences == 0 and by_tp[2].sequences == 0
    weights = 2 * 72_706_203_648 // 4
    budget = (int(80 * GiB * 0.9) - 3 * GiB - weights) * 4
    assert by_tp[4].weights_per_gpu == weights
    assert by_tp[4].sequences == budget // (327_680 * 32768) == 14
    assert (plan.recommended.tensor_parallel_size, plan.recommended.replicas) == (4, 4)


def test_cli_prints_the_plan_and_the_settings(capsys):
    import launch.plan as cli

    assert cli.main(["--student", "Qwen2.5-7B", "--context", "16384", "--nodes", "2", "--gpus-per-node", "8",
                     "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    for text in ("zero3_offload + ckpt", "deepspeed: ds_configs/zero2.json", "gradient_checkpointing: true",
                 "tensor_parallel_size: 4", "stage2_nodes: 2", "sbatch --nodes=2 --gpus-per-node=8"):
        assert text in out


def test_cli_unknown_model_says_what_is_bundled(capsys):
    import launch.plan as cli

    assert cli.main(["--student", "Llama-9B", "--context", "4096"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'Llama-9B'" in err and "Qwen2.5-7B" in err
