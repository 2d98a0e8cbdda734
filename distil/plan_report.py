"""The planner's printed report: the memory table per ZeRO stage, the teacher's layouts, and the YAML
and sbatch lines to use (launch/plan.py prints it)."""

from __future__ import annotations

from distil.plan import GiB, StudentPlan, TeacherPlan, kv_bytes_per_token


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def format_plan(student: StudentPlan, teacher: TeacherPlan, nodes: int, gpus_per_node: int,
                gpu_memory_gib: float, teacher_nodes: int) -> str:
    s, a = student, student.arch
    lines = [
        f"Student {a.name}: {s.total_params / 1e9:.2f} B parameters "
        f"(largest layer {s.largest_layer_params / 1e6:.1f} M), "
        f"{s.tokens} tokens per micro-batch, {nodes} node(s) x {gpus_per_node} GPU(s) x {gpu_memory_gib:g} GiB",
        "",
        "  per GPU, GiB            model states  activations  logits  buffers   total  fits",
    ]
    usable = s.options[0].usable
    for o in s.options:
        name = o.strategy + (" + ckpt" if o.checkpointing else "")
        lines.append(f"  {name:<22} {_gib(o.states.gpu_bytes):>13} {_gib(o.activations):>12} {_gib(o.logits):>7} "
                     f"{_gib(o.buffers):>8} {_gib(o.total):>7}  {'yes' if o.fits else 'no'}")
    offload = next(o for o in s.options if o.strategy == "zero3_offload")
    headroom = 1 - usable / (gpu_memory_gib * GiB)
    lines += [f"  (usable per GPU: {_gib(usable)} GiB after {headroom:.0%} headroom; zero3_offload needs "
              f"{_gib(offload.states.cpu_bytes)} GiB of CPU memory per node; "
              f"logits: {s.labelled_tokens} labelled tokens)",
              ""]
    t = teacher
    lines.append(f"Teacher {t.arch.name}: {t.total_params / 1e9:.2f} B parameters, "
                 f"{_gib(kv_bytes_per_token(t.arch) * t.context)}"
                 f" GiB of KV cache per {t.context}-token sequence, {teacher_nodes} node(s) x {gpus_per_node} GPU(s)")
    lines.append("  TP  weights/GPU GiB  KV budget/replica GiB  sequences  replicas")
    for o in t.options:
        mark = "" if o.fits(t.min_sequences) else f"  (< {t.min_sequences} sequences)"
        lines.append(f"  {o.tensor_parallel_size:>2} {_gib(o.weights_per_gpu):>16} {_gib(o.kv_budget_per_replica):>22} "
                     f"{o.sequences:>10} {o.replicas:>9}{mark}")
    lines.append("")
    lines += recommendation(student, teacher, nodes, gpus_per_node, teacher_nodes)
    return "\n".join(lines)


def recommendation(student: StudentPlan, teacher: TeacherPlan, nodes: int, gpus_per_node: int,
                   teacher_nodes: int) -> list[str]:
    """The YAML and sbatch lines to use, or what to change when nothing fits."""
    best, tbest = student.recommended, teacher.recommended
    lines = ["Recommended:"]
    if best is None:
        lines.append(f"  student: nothing fits {student.tokens} tokens on {nodes} x {gpus_per_node} GPUs; "
                     "add nodes, use GPUs with more memory or lower train.pack_length")
    else:
        lines.append(f"  student: ds_configs/{best.strategy}.json"
                     f"{' with gradient checkpointing' if best.checkpointing else ''} ({_gib(best.total)} GiB per GPU)")
    if tbest is None:
        lines.append(f"  teacher: no tensor-parallel size holds {teacher.min_sequences} sequences of {teacher.context} "
                     "tokens; lower teacher.max_model_len or use GPUs with more memory")
    else:
        lines.append(f"  teacher: TP {tbest.tensor_parallel_size}, {tbest.replicas} replica(s) of "
                     f"{tbest.sequences} concurrent {teacher.context}-token sequences")
    if best is None or tbest is None:  # settings for a stage that cannot run would be a plan that cannot run
        return lines
    lines += ["", "  # experiment YAML",
              "  model:", f"    gradient_checkpointing: {str(best.checkpointing).lower()}",
              "  train:", f"    deepspeed: ds_configs/{best.strategy}.json", f"    pack_length: {student.tokens}",
              "  teacher:", f"    tensor_parallel_size: {tbest.tensor_parallel_size}",
              f"    max_model_len: {teacher.context}",
              "  slurm:", f"    gpus_per_node: {gpus_per_node}", f"    stage1_nodes: {teacher_nodes}",
              f"    stage2_nodes: {nodes}", "",
              "  # sbatch (slurm/pipeline.sh CONFIG passes these from the YAML)",
              f"  sbatch --nodes={teacher_nodes} --gpus-per-node={gpus_per_node} slurm/stage1.sbatch CONFIG",
              f"  sbatch --nodes={nodes} --gpus-per-node={gpus_per_node} slurm/stage2.sbatch CONFIG"]
    return lines
