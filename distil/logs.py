"""What a stage prints on the terminal, and where the engines' own logs go.

By default the terminal shows the stage's own lines (the loggers of distil, teacher_serving, eval and
the launcher), progress bars and results; vLLM, Ray, DeepSpeed, transformers and Python warnings
write to the stage's log file (launch/annotate.py: <data.key_info_path>.log, launch/train.py:
<train.output_dir>/train.log, launch/evaluate.py: <eval.output_dir>/evaluate.log), which also holds
the stage's own lines. `--verbose` or DISTIL_VERBOSE=1 prints everything on the terminal as well.
vLLM's engine processes are spawned: they read the routing from VLLM_LOGGING_CONFIG_PATH, which
`engine_log_env` points at a logging config beside the log file (set it around the work, e.g. with
distil.backend.scoped_environ), so every process of a stage writes there.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

VERBOSE_ENV = "DISTIL_VERBOSE"
OURS = ("distil", "teacher_serving", "eval", "launch", "__main__", "bench")
LIBRARIES = ("DeepSpeed", "transformers", "ray", "datasets", "accelerate", "torch", "py.warnings")
FORMAT = "%(asctime)s %(name)s: %(message)s"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _Ours(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OURS


def setup(log_file: str | Path, verbose_flag: bool = False, level: int = logging.INFO, fmt: str = FORMAT) -> Path:
    """Terminal + log file for this process (handlers of an earlier call are replaced, others such as
    pytest's kept); returns the log file."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"  # inherited by DeepSpeed ranks, Ray's local workers, engine processes
    log_file = Path(log_file).resolve()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_terminal = logging.StreamHandler()
    to_terminal.setLevel(level)
    if not verbose():
        to_terminal.addFilter(_Ours())
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "distil_logs", False)]:
        root.removeHandler(handler)
        handler.close()
    for handler in (to_terminal, to_file):
        handler.setFormatter(logging.Formatter(fmt))
        handler.distil_logs = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in OURS:  # our DEBUG lines (the resolved config, ...) reach the file, not the terminal
        logging.getLogger(name).setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    return log_file


def engine_log_env(log_file: str | Path) -> dict[str, str]:
    """The environment that sends vLLM's logs, in every process it spawns, to `log_file`, and keeps the
    engine processes' library warnings (torch's C++ warnings, deprecation notices) off the terminal
    ({} when verbose). A warning vLLM logs before it has configured its logging still reaches the
    terminal (one line per engine process)."""
    if verbose():
        return {}
    log_file = Path(log_file).resolve()
    config = log_file.with_name(log_file.name + ".vllm.json")
    config.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(log_file), "formatter": "plain"}},
        "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}}}))
    return {"VLLM_LOGGING_CONFIG_PATH": str(config), "TORCH_CPP_LOG_LEVEL": "ERROR",
            "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}


def route_libraries() -> None:
    """Send the libraries that log through handlers of their own (DeepSpeed, transformers) to our handlers:
    call it after importing them. Their progress bars (loading weights) go too, unless verbose."""
    if verbose():
        return
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
