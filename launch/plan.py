"""Plan a cluster run: per-GPU memory of the student under ZeRO-2/3/3+offload, activations with and
without gradient checkpointing, the teacher's tensor-parallel size and replicas; prints the YAML
and sbatch settings to use.

    python launch/plan.py --student Qwen2.5-7B --context 16384 --nodes 2 --gpus-per-node 8 --gpu-memory 80

--student/--teacher take a bundled name (launch/configs/models: Qwen2.5-0.5B/1.5B/3B/7B/72B), a model
folder or a config.json. Pure arithmetic: no GPU, no download. Exit status 0 = a plan printed,
2 = an input no cluster or model can have (named, with the limit; nothing printed), or nothing fits
(the tables and what to change, but no settings).
"""

from __future__ import annotations

import argparse
import sys

from distil.architecture import PlanError, load_architecture
from distil.plan import plan_student, plan_teacher
from distil.plan_report import format_plan


POSITIVE = ("context", "nodes", "gpus_per_node", "gpu_memory", "micro_batch_rows", "chunk_tokens", "teacher_context",
            "teacher_nodes", "teacher_min_sequences")


def check_flags(args: argparse.Namespace) -> None:
    """Every figure of the plan comes from these: each must be one a cluster and a model can have."""
    problems = [f"--{name.replace('_', '-')} {getattr(args, name):g}: must be a positive number"
                for name in POSITIVE if getattr(args, name) is not None
                and not (0 < getattr(args, name) < float("inf"))]
    if not 0 < args.answer_fraction <= 1:
        problems.append(f"--answer-fraction {args.answer_fraction:g}: must be in (0, 1]")
    if problems:
        raise PlanError("; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="student model (bundled name, folder or config.json)")
    parser.add_argument("--context", type=int, required=True, help="tokens per packed row (train.pack_length)")
    parser.add_argument("--nodes", type=int, default=1, help="Stage 2 nodes (slurm.stage2_nodes)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU")
    parser.add_argument("--micro-batch-rows", type=int, default=1, help="train.micro_batch_rows")
    parser.add_argument("--answer-fraction", type=float, default=0.25,
                        help="share of a row's tokens that are labelled answers (drives the logits memory)")
    parser.add_argument("--chunk-tokens", type=int, default=2048, help="loss.lm_head_chunk_tokens")
    parser.add_argument("--teacher", default="Qwen2.5-72B", help="teacher model (bundled name, folder or config.json)")
    parser.add_argument("--teacher-context", type=int, default=32768,
                        help="tokens of the longest report's prompt + answer (teacher.max_model_len)")
    parser.add_argument("--teacher-nodes", type=int, help="Stage 1 nodes (default: --nodes)")
    parser.add_argument("--teacher-min-sequences", type=int, default=8,
                        help="longest-report sequences each replica's KV cache must hold at once")
    args = parser.parse_args(argv)
    teacher_nodes = args.nodes if args.teacher_nodes is None else args.teacher_nodes
    try:
        check_flags(args)
        student = plan_student(load_architecture(args.student), args.context, args.nodes, args.gpus_per_node,
                               args.gpu_memory, args.micro_batch_rows, args.answer_fraction, args.chunk_tokens)
        teacher = plan_teacher(load_architecture(args.teacher), args.teacher_context, teacher_nodes,
                               args.gpus_per_node, args.gpu_memory, min_sequences=args.teacher_min_sequences)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(student, teacher, args.nodes, args.gpus_per_node, args.gpu_memory, teacher_nodes))
    if student.recommended is None or teacher.recommended is None:
        print("error: nothing fits for " + " and ".join(
            name for name, p in (("the student", student), ("the teacher", teacher)) if p.recommended is None)
            + ": no settings printed; change the inputs as 'Recommended' says", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
