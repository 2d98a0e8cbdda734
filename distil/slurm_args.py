"""From the experiment YAML's `slurm` section to sbatch options, so no template is edited per experiment.

Precedence, lowest first: the `#SBATCH` defaults in slurm/*.sbatch (an 8-GPU node), the YAML,
DISTIL_SLURM_<KEY> environment variables (e.g. DISTIL_SLURM_PARTITION=gpu), and `slurm.key=value`
overrides on the command line. Options left null are not passed, so sbatch's own SBATCH_*
variables and the cluster's defaults still apply to them.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import typing
from collections.abc import Mapping
from pathlib import Path

from distil.align_config import policy_path
from distil.config import ConfigError, ExperimentConfig, SlurmConfig, load_config

ENV_PREFIX = "DISTIL_SLURM_"
# pipeline order; onpolicy (Stage 2 in rounds, docs/onpolicy.md) and align (after Stage 2) run only when named
STAGES = ("stage1", "stage2", "onpolicy", "align", "eval")


def env_overrides(environ: Mapping[str, str]) -> list[str]:
    """DISTIL_SLURM_<KEY>=value variables as slurm.<key>=value overrides; an unknown name is an error.

    Text keys take the value verbatim (a shell line is not YAML); an empty value or "null" = null.
    """
    hints = typing.get_type_hints(SlurmConfig)
    overrides, unknown = [], []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        key, value = name[len(ENV_PREFIX):].lower(), environ[name]
        if key not in hints:
            unknown.append(name)
        elif hints[key] in (str, str | None):
            text = "null" if value in ("", "null") and hints[key] != str else json.dumps(value)
            overrides.append(f"slurm.{key}={text}")
        else:
            overrides.append(f"slurm.{key}={value}")
    if unknown:
        known = ", ".join(ENV_PREFIX + f.name.upper() for f in dataclasses.fields(SlurmConfig))
        raise ConfigError(f"unknown environment variable(s) {unknown}; known: {known}")
    return overrides


def resolve(config: str | Path, overrides: list[str], environ: Mapping[str, str]) -> ExperimentConfig:
    """The experiment config with environment variables, then command-line overrides, applied."""
    return load_config(config, env_overrides(environ) + list(overrides))


def sbatch_options(cfg: ExperimentConfig, stage: str, config_name: str = "") -> list[str]:
    """The sbatch options of one stage; they override the template's #SBATCH lines."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {list(STAGES)}")
    s = cfg.slurm
    name = f"distil-{stage}" + (f"-{config_name}" if config_name else "")
    options = [f"--job-name={name}", f"--output={s.log_dir}/%x-%j.out"]
    options += [f"--{key}={getattr(s, key)}" for key in ("partition", "account", "qos") if getattr(s, key)]
    nodes = {"stage1": s.stage1_nodes, "stage2": s.stage2_nodes, "align": s.stage2_nodes, "eval": 1,
             "onpolicy": s.stage1_nodes + s.stage2_nodes}[stage]  # the teacher's nodes + the student's
    gpus = s.eval_gpus if stage == "eval" else s.gpus_per_node
    minutes = {"stage1": s.stage1_minutes, "stage2": s.stage2_minutes, "align": s.stage2_minutes,
               "onpolicy": s.stage2_minutes, "eval": s.eval_minutes}[stage]
    options += [f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={s.cpus_per_node}",
                f"--gpus-per-node={gpus}", f"--time={minutes}"]
    if s.mem is not None:
        options.append(f"--mem={s.mem}")
    if stage in ("stage2", "onpolicy", "align"):
        options += [f"--signal=B:USR1@{s.save_before_timeout_s}", "--requeue"]
    return options + list(s.extra_args)


def stage_variables(cfg: ExperimentConfig) -> dict[str, str]:
    """What the templates read from the config, as DISTIL_* shell variables."""
    s = cfg.slurm
    return {
        "DISTIL_GPUS_PER_NODE": str(s.gpus_per_node),
        "DISTIL_RANKS_PER_NODE": str(s.ranks_per_node or ""),  # empty = one per GPU SLURM allocated
        "DISTIL_CPUS_PER_NODE": str(s.cpus_per_node),
        "DISTIL_RAY_START_TIMEOUT_S": str(s.ray_start_timeout_s),
        "DISTIL_TRAIN_OUTPUT_DIR": cfg.train.output_dir,
        "DISTIL_STUDENT_INIT": cfg.model.name_or_path,
        "DISTIL_TINY_MODEL": "1" if cfg.model.tiny else "",
        "DISTIL_TEACHER": cfg.teacher.model,
        "DISTIL_KEY_INFO_PATH": cfg.data.key_info_path or "",
        "DISTIL_EVAL_OUTPUT_DIR": cfg.eval.output_dir,
        "DISTIL_ALIGN_POLICY": policy_path(cfg.align, cfg.train.output_dir),
        "DISTIL_ALIGN_PAIRS_PATH": cfg.align.pairs_path,
        "DISTIL_ALIGN_OUTPUT_DIR": cfg.align.output_dir,
        "DISTIL_STAGE1_NODES": str(s.stage1_nodes),
        "DISTIL_ONPOLICY_OUTPUT_DIR": cfg.onpolicy.output_dir,
        "DISTIL_LOG_DIR": s.log_dir,
        "DISTIL_SLURM_ENV_SETUP": s.env_setup or "",
    }


def shell_assignments(variables: dict[str, str]) -> str:
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in variables.items())
