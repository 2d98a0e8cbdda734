"""From the slurm section to sbatch options (no SLURM needed): precedence, validation, the dry run,
the template defaults, Stage 2's exit status (SLURM's commands stubbed), and the trainer callback that
saves before the time limit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from distil.config import ConfigError, load_config
from distil.slurm_args import env_overrides, resolve, sbatch_options, stage_variables

TINY = REPO / "launch" / "configs" / "tiny_cpu.yaml"


def test_environment_variables_become_overrides_verbatim():
    env = {"DISTIL_SLURM_PARTITION": "gpu", "DISTIL_SLURM_STAGE2_NODES": "4", "HOME": "/root",
           "DISTIL_SLURM_ENV_SETUP": "module load cuda: 12.4 && source .venv/bin/activate",
           "DISTIL_SLURM_ACCOUNT": "", "DISTIL_SLURM_EXTRA_ARGS": "[--exclusive]"}
    cfg = load_config(TINY, env_overrides(env))
    s = cfg.slurm
    assert (s.partition, s.stage2_nodes, s.account, s.extra_args) == ("gpu", 4, None, ["--exclusive"])
    assert s.env_setup == "module load cuda: 12.4 && source .venv/bin/activate"  # not parsed as YAML


def test_unknown_variable_is_an_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match=r"DISTIL_SLURM_PARTITON.*DISTIL_SLURM_PARTITION"):
        env_overrides({"DISTIL_SLURM_PARTITON": "gpu"})


def test_precedence_yaml_then_environment_then_command_line(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("slurm:\n  partition: from_yaml\n  account: from_yaml\n  qos: from_yaml\n")
    cfg = resolve(path, ["slurm.qos=from_cli"], {"DISTIL_SLURM_ACCOUNT": "from_env", "DISTIL_SLURM_QOS": "from_env"})
    assert (cfg.slurm.partition, cfg.slurm.account, cfg.slurm.qos) == ("from_yaml", "from_env", "from_cli")


def test_sbatch_options_of_each_stage(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("slurm:\n  partition: gpu\n  account: proj\n  stage1_nodes: 2\n  stage2_nodes: 4\n"
                    "  mem: '0'\n  extra_args: ['--exclusive']\n  save_before_timeout_s: 600\n")
    cfg = load_config(path)
    common = ["--partition=gpu", "--account=proj"]
    assert sbatch_options(cfg, "stage1", "x") == [
        "--job-name=distil-stage1-x", "--output=runs/slurm/%x-%j.out", *common, "--nodes=2", "--ntasks-per-node=1",
        "--cpus-per-task=64", "--gpus-per-node=8", "--time=1440", "--mem=0", "--exclusive"]
    stage2 = sbatch_options(cfg, "stage2", "x")
    assert "--nodes=4" in stage2 and "--signal=B:USR1@600" in stage2 and "--requeue" in stage2
    evaluation = sbatch_options(cfg, "eval", "x")
    assert "--nodes=1" in evaluation and "--gpus-per-node=1" in evaluation and "--time=720" in evaluation
    assert stage_variables(cfg)["DISTIL_RANKS_PER_NODE"] == ""  # one rank per allocated GPU


@pytest.mark.parametrize("override,message", [
    ("slurm.stage2_minutes=0", "slurm.stage2_minutes: must be positive"),
    ("slurm.gpus_per_node=0", "slurm.ranks_per_node: a CPU-only cluster"),
    ("slurm.extra_args=[exclusive]", "slurm.extra_args: sbatch options start with '-'"),
    ("slurm.eval_gpus=9", "slurm.eval_gpus: must be <= gpus_per_node (8)"),
    ("slurm.save_before_timeout_s=70000", "SLURM signals at most 65535 s ahead"),
    ("slurm.stage2_minutes=5", "must leave Stage 2 at least a minute of its 300 s"),
])
def test_bad_slurm_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, [override])


def _pipeline(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env)
    return subprocess.run([str(REPO / "slurm" / "pipeline.sh"), *args], capture_output=True, text=True,
                          env=environ, timeout=120)


def test_dry_run_prints_a_runnable_chain_of_sbatch_commands():
    proc = _pipeline("--dry-run", str(TINY), "slurm.partition=gpu", DISTIL_SLURM_STAGE2_NODES="3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split("=")[0] for line in lines] == ["JOB_stage1", "JOB_stage2", "JOB_eval"]
    assert "--partition=gpu" in lines[0] and "slurm/stage1.sbatch" in lines[0] and "--dependency" not in lines[0]
    assert "--nodes=3" in lines[1] and "--dependency=afterok:$JOB_stage1 --kill-on-invalid-dep=yes" in lines[1]
    assert "--dependency=afterok:$JOB_stage2" in lines[2] and lines[2].endswith(f"{TINY} slurm.partition=gpu)")


def test_alignment_runs_after_stage2_and_before_the_evaluation_like_stage2():
    proc = _pipeline("--dry-run", "--stages", "stage2,align,eval", str(TINY), DISTIL_SLURM_STAGE2_NODES="3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split("=")[0] for line in lines] == ["JOB_stage2", "JOB_align", "JOB_eval"]
    align = lines[1]
    assert "slurm/align.sbatch" in align and "--dependency=afterok:$JOB_stage2 --kill-on-invalid-dep=yes" in align
    assert "--nodes=3" in align and "--signal=B:USR1@300" in align and "--requeue" in align
    assert "--dependency=afterok:$JOB_align" in lines[2]


@pytest.mark.parametrize("args,message", [
    (["--stages", "eval,stage2", str(TINY)], "--stages must be in pipeline order"),
    (["--stages", "align,stage2", str(TINY)], "--stages must be in pipeline order (stage1,stage2,onpolicy,align,eval)"),
    (["--stages", "stage3", str(TINY)], "unknown stage 'stage3'"),
    (["nope.yaml"], "config nope.yaml not found"),
    ([str(TINY), "slurm.stage1_nodes=0"], "slurm.stage1_nodes: must be positive"),
])
def test_pipeline_errors_are_clear(args, message):
    proc = _pipeline("--dry-run", *args)
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.parametrize("launcher_status, status, words", [
    (0, 0, "done: "),
    (2, 2, "training refused its input (launch/train.py exit 2); fix what the error above names"),
    (1, 1, "training failed (exit 1)"),
    (137, 1, "training failed (exit 137)"),  # a node lost: resubmitting resumes
])
def test_stage2_passes_a_user_error_through_and_marks_other_failures_rerunnable(tmp_path, launcher_status, status,
                                                                                 words):
    """slurm/stage2.sbatch run as SLURM would, with scontrol, getent and srun stubbed (srun exits as the
    node launchers would): exit 2 only for train.py's own user error, 1 for what a resubmission may cure."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in (("scontrol", 'if [ "$2" = hostnames ]; then echo n1; fi'),
                       ("getent", "echo 127.0.0.1 STREAM n1"), ("srun", f"exit {launcher_status}")):
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               SLURM_JOB_NODELIST="n1", SLURM_JOB_ID=str(os.getpid()), SLURM_GPUS_ON_NODE="1")
    proc = subprocess.run(["bash", "slurm/stage2.sbatch", str(TINY), f"train.output_dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert words in proc.stdout + proc.stderr


def _stubbed_slurm(tmp_path: Path, srun: str) -> dict:
    """scontrol, getent and srun replaced by scripts (srun's body given): a one-node job on this machine."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in (("scontrol", 'if [ "$2" = hostnames ]; then echo n1; fi'),
                       ("getent", "echo 127.0.0.1 STREAM n1"), ("srun", srun)):
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    return dict(os.environ, PATH=f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}",
                SLURM_JOB_NODELIST="n1", SLURM_JOB_ID=str(os.getpid()), SLURM_GPUS_ON_NODE="1")


@pytest.mark.parametrize("pairs_status, launcher_status, status, words", [
    (0, 0, 0, "done: "),
    (2, 0, 2, "making the preference pairs refused its input (launch/make_pairs.py exit 2)"),
    (1, 0, 1, "making the preference pairs failed (exit 1); resubmitting resumes them"),
    (0, 2, 2, "alignment refused its input (launch/align.py exit 2)"),
    (0, 137, 1, "alignment failed (exit 137)"),
])
def test_align_makes_the_pairs_then_runs_dpo_on_every_node(tmp_path, pairs_status, launcher_status, status, words):
    """slurm/align.sbatch as SLURM runs it, srun stubbed (its exit status per step): the pairs first, then the
    DeepSpeed launchers of Stage 2 with launch/align.py; exit 2 only for a user error, 1 for what a
    resubmission cures."""
    policy = tmp_path / "student" / "hf"
    policy.mkdir(parents=True)
    (policy / "config.json").write_text("{}")
    srun = (f'echo "srun $*" >> {tmp_path / "calls"}\n'
            f'case "$*" in *make_pairs.py*) exit {pairs_status};; *) exit {launcher_status};; esac')
    proc = subprocess.run(["bash", "slurm/align.sbatch", str(TINY), f"train.output_dir={tmp_path / 'student'}",
                           f"align.output_dir={tmp_path / 'aligned'}"], cwd=REPO, capture_output=True, text=True,
                          env=_stubbed_slurm(tmp_path, srun), timeout=120)
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert words in proc.stdout + proc.stderr
    calls = (tmp_path / "calls").read_text().split("srun ")[1:]  # a call's arguments may span lines
    assert "launch/make_pairs.py --config" in calls[0]
    assert len(calls) == (1 if pairs_status else 2) and (pairs_status or "launch/align.py" in calls[1])


def test_align_needs_the_student_stage2_exports(tmp_path):
    proc = subprocess.run(["bash", "slurm/align.sbatch", str(TINY), f"train.output_dir={tmp_path / 'none'}"], cwd=REPO,
                          capture_output=True, text=True, env=_stubbed_slurm(tmp_path, "exit 0"), timeout=120)
    assert proc.returncode == 2 and f"no student to align at {tmp_path / 'none'}/hf" in proc.stderr


def test_templates_default_to_an_8_gpu_node_and_stage2_can_be_requeued():
    for name in ("stage2", "align"):
        text = (REPO / "slurm" / f"{name}.sbatch").read_text()
        for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300"):
            assert line in text, (name, line)
    assert "#SBATCH --gpus-per-node=8" in (REPO / "slurm" / "stage1.sbatch").read_text()
    for name in ("stage1", "stage2", "align", "eval"):
        proc = subprocess.run(["bash", "-n", str(REPO / "slurm" / f"{name}.sbatch")], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_stop_file_makes_the_trainer_save_and_stop(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from distil.preemption import SaveAndStopCallback

    stop_file = tmp_path / ".save-and-stop-1"
    callback = SaveAndStopCallback(stop_file)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    state, control = TrainerState(global_step=7), TrainerControl()
    callback.on_step_end(args, state, control)
    assert not (control.should_save or control.should_training_stop or callback.stopped)
    stop_file.touch()
    callback.on_step_end(args, state, control)
    assert control.should_save and control.should_training_stop and callback.stopped
    callback.on_save(args, state, control)
    assert Path(f"{stop_file}.saved").read_text() == "checkpoint-7\n"
    assert SaveAndStopCallback(None).stop_file is None  # outside stage2.sbatch: does nothing
