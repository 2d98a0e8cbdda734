"""A real one-node SLURM cluster for tests: Debian's slurmctld + slurmd + munge, installed with
apt-get when missing, configured in a private folder with its own ports and munge socket, and
stopped afterwards (daemons by their pid files; nothing else on the machine is touched).

Facts this relies on (see ../shared/DESIGN.md): SlurmctldHost must be the machine's short
hostname; munged must run as the munge user; EnforcePartLimits=ALL makes an impossible request
fail at submission instead of pending forever; with proctrack/linuxproc a daemon started by a job
outlives the job, so the job scripts stop what they start.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    """apt-get install the four Debian packages once (about 10 s); an error says what to run."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"SLURM is not installed and installing it needs root: apt-get install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update"], env=env, capture_output=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class SlurmCluster:
    """One node, one partition ("debug"), all of this machine's CPUs, no GPUs, no accounting."""

    def __init__(self):
        ensure_installed()
        # munged runs as the munge user, which must reach its socket: not under pytest's 0700 tmp folders
        self.root = Path(tempfile.mkdtemp(prefix="distil-slurm-"))
        self.root.chmod(0o755)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._pidfiles = {name: self.root / f"{name}.pid" for name in ("slurmctld", "slurmd")}

    # -- life cycle --------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> SlurmCluster:
        self._start_munge()
        for folder in ("state", "spool", "log"):
            (self.root / folder).mkdir(exist_ok=True)
        self.conf.write_text(self._slurm_conf())
        self._run(["slurmctld", "-f", str(self.conf), "-c"])
        self._run(["slurmd", "-f", str(self.conf), "-N", self.host])
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if proc.stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        raise RuntimeError(f"SLURM did not come up in {timeout:.0f} s:\n{self.logs()}")

    def stop(self) -> None:
        """Cancel what still runs, stop slurmd, slurmctld and munged (SIGTERM by pid file, SIGKILL after
        20 s) and remove the folder. A running job's slurmstepd outlives slurmd, so jobs go first."""
        if _alive(_pid(self._pidfiles["slurmctld"])):
            self.cancel_all()
        pids = [_pid(f) for f in self._pidfiles.values()] + [_pid(self.munge_dir / "munged.pid")]
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 20
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def cancel_all(self, timeout: float = 60) -> None:
        """scancel every job and wait until squeue lists none (or `timeout`)."""
        self.run(["scancel", "--partition=debug"], timeout=30)
        deadline = time.time() + timeout
        while time.time() < deadline:
            squeue = self.run(["squeue", "-h", "-o", "%i %T"], timeout=30)
            if squeue.returncode != 0 or not squeue.stdout.strip():
                break
            time.sleep(1)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_munge(self) -> None:
        self.munge_dir.mkdir(exist_ok=True)
        shutil.chown(self.munge_dir, "munge", "munge")
        self.munge_dir.chmod(0o755)
        cmd = ["runuser", "-u", "munge", "--", "munged", f"--socket={self.munge_socket}",
               f"--pid-file={self.munge_dir / 'munged.pid'}", f"--log-file={self.munge_dir / 'munged.log'}",
               f"--seed-file={self.munge_dir / 'munged.seed'}"]
        self._run(cmd)

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}\n{self.logs()}")

    def _slurm_conf(self) -> str:
        r = self.root
        # job ids pick the jobs' ports (slurm/common.sh): start at a random id so runs do not share them.
        # cred_expire is also how long SLURM holds a requeued job before restarting it (default 120 s).
        return f"""\
ClusterName=distiltest
SlurmctldHost={self.host}
SlurmUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=30
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={self._pidfiles['slurmctld']}
SlurmdPidFile={self._pidfiles['slurmd']}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
EnforcePartLimits=ALL
JobRequeue=1
MinJobAge=3600
FirstJobId={random.randint(1000, 900000)}
KillWait=10
InactiveLimit=0
SlurmdParameters=config_overrides
NodeName={self.host} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""

    # -- jobs --------------------------------------------------------------------------------

    def run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        """A SLURM client command (sbatch, scontrol, ...) against this cluster."""
        env = dict(self.env, **kwargs.pop("env", {}))
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=kwargs.pop("timeout", 120),
                              **kwargs)

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol's fields of a job (JobState, ExitCode, Reason, Restarts, ...)."""
        proc = self.run(["scontrol", "show", "job", "-o", job_id])
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {proc.stderr}")
        fields = {}
        for item in proc.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_ids: list[str], timeout: float, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                              "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> dict:
        """Poll until every job reaches a final state; a timeout raises with the cluster's logs."""
        deadline = time.time() + timeout
        while True:
            states = {j: self.job(j)["JobState"] for j in job_ids}
            if all(s in done for s in states.values()):
                return states
            if time.time() > deadline:
                raise TimeoutError(f"jobs still {states} after {timeout:.0f} s:\n{self.logs()}")
            time.sleep(1)

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*.log")) + [self.munge_dir / "munged.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# A tiny CPU experiment whose every path is absolute under one folder, for jobs that run elsewhere.

REPO = Path(__file__).resolve().parents[1]


def tiny_experiment(folder: Path, cpus: int, name: str = "tiny", **sections: dict) -> Path:
    """Write <folder>/<name>.yaml: launch/configs/tiny_cpu.yaml with its outputs under `folder`, a
    short Stage 2, and a slurm section for this CPU-only cluster; `sections` update it."""
    import yaml

    cfg = yaml.safe_load((REPO / "launch" / "configs" / "tiny_cpu.yaml").read_text())
    cfg["data"].update(sources=[str(REPO / "data" / "sample")], prepared_dir=str(folder / "data"),
                       key_info_path=str(folder / "key_info.jsonl"))
    cfg["model"]["name_or_path"] = str(folder / "student-init")
    cfg["train"].update(output_dir=str(folder / "student"), max_length=512, pack_length=1024, max_steps=6,
                        save_steps=3, logging_steps=1, save_total_limit=None, report_to=[], trace_data=True)
    cfg["teacher"]["model"] = str(folder / "teacher")
    cfg["eval"]["output_dir"] = str(folder / "eval")
    cfg["slurm"] = {"gpus_per_node": 0, "cpus_per_node": cpus, "ranks_per_node": 2, "eval_gpus": 0,
                    "stage1_minutes": 20, "stage2_minutes": 20, "eval_minutes": 20,
                    "ray_start_timeout_s": 180, "log_dir": str(folder / "logs")}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def prepare_inputs(config: Path, teacher: bool = False) -> None:
    """Prepared splits and the tiny student (and a tiny teacher) through the launch scripts."""
    import launch.make_tiny_model as make_tiny_model
    import launch.prepare_data as prepare_data
    import yaml

    assert prepare_data.main(["--config", str(config)]) == 0
    assert make_tiny_model.main(["--config", str(config)]) == 0
    if teacher:
        path = yaml.safe_load(config.read_text())["teacher"]["model"]
        assert make_tiny_model.main(["--config", str(config), f"model.name_or_path={path}"]) == 0


def write_ledger(config: Path, missing: int = 2) -> None:
    """Stage 1's ledger written by hand (for Stage 2 alone): every train report but `missing` has key info."""
    import json

    import yaml

    from distil.config import load_config
    from distil.data import read_jsonl
    from distil.teacher_config import annotation_key

    data = yaml.safe_load(config.read_text())["data"]
    rows = read_jsonl(Path(data["prepared_dir"]) / "train.jsonl")
    teacher = annotation_key(load_config(config).teacher)  # as Stage 1 writes them for this config
    Path(data["key_info_path"]).write_text("".join(
        json.dumps({"id": r["id"], "lang": r["lang"], "status": "ok", "key_info": "Key facts: " + r["summary"][:160],
                    **teacher}) + "\n" for r in rows[missing:]))


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment contains `text` (did a job leave anything running?)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline + environ and int(proc.name) != os.getpid():
            found.append(proc.name + ": " + cmdline.replace(bytes(1), b" ").decode(errors="replace")[:200])
    return found


# ---------------------------------------------------------------------------------------------
# Two SLURM nodes on this machine (../shared/DESIGN.md, "Two SLURM nodes on one machine").


def _sh(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


class TwoNodeSlurmCluster(SlurmCluster):
    """Nodes n1 and n2, each a slurmd in its own network, UTS and mount namespace, joined by veth pairs to
    a bridge this class creates: each node has its own hostname, address and port space (two ranks can
    both listen on one port, as on two machines), and traffic stays on the bridge (no route out). The
    filesystem is shared, like a cluster's shared filesystem; /etc/hosts is the cluster's (bind-mounted
    per node). slurmctld runs in a third namespace, munged in this one (its socket is a file).

    `node_command(name, cmd)` runs a command on a node without SLURM (the plain-hostfile path)."""

    NODES = ("n1", "n2")

    def __init__(self, cpus_per_node: int = 2):
        super().__init__()
        self.cpus = cpus_per_node
        tag = f"d{os.getpid() % 100000}"  # names of this cluster's links and namespaces (<= 15 chars)
        self.bridge, self.netns = f"{tag}br", [f"{tag}n{i}" for i in range(3)]  # 0: slurmctld, 1, 2: nodes
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        free = [n for n in range(200, 250) if f" 10.{n}.0." not in used]
        if not free:
            raise RuntimeError("no free 10.2xx.0.0/24 subnet for the test cluster's bridge")
        self.subnet = f"10.{random.choice(free)}.0"
        self.ctld_addr = f"{self.subnet}.2"
        self.addr = {name: f"{self.subnet}.{11 + i}" for i, name in enumerate(self.NODES)}
        self.hosts_file = self.root / "hosts"
        self._daemons: dict[str, subprocess.Popen] = {}

    def start(self, timeout: float = 60) -> TwoNodeSlurmCluster:
        self._start_munge()
        for folder in ("state", "log", *(f"spool/{n}" for n in self.NODES)):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.hosts_file.write_text(f"127.0.0.1 localhost\n{self.subnet}.1 {self.host}-bridge\n"
                                   + "".join(f"{a} {n}\n" for n, a in self.addr.items()))
        self._network_up()
        self.conf.write_text(self._slurm_conf())
        log = open(self.root / "log" / "daemons.out", "ab")
        self._daemons["slurmctld"] = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns[0]}", "slurmctld", "-D", "-f", str(self.conf)],
            env=self.env, stdout=log, stderr=log)
        for i, name in enumerate(self.NODES, start=1):
            script = f"hostname {name} && mount --bind {self.hosts_file} /etc/hosts && exec slurmd -D -f {self.conf} -N {name}"
            self._daemons[name] = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns[i]}", "unshare", "--uts", "--mount", "--propagation",
                 "slave", "sh", "-c", script], env=self.env, stdout=log, stderr=log)
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
            states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
            if states == {n: "idle" for n in self.NODES}:
                return self
            dead = [n for n, p in self._daemons.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited at start:\n{self.logs()}")
            time.sleep(0.3)
        raise RuntimeError(f"the two SLURM nodes did not come up in {timeout:.0f} s:\n{self.logs()}")

    def _network_up(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        addrs = [self.ctld_addr, *self.addr.values()]
        for i, (ns, addr) in enumerate(zip(self.netns, addrs)):
            veth = f"{self.bridge[:-2]}v{i}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "link", "set", veth, "master", self.bridge, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def stop(self) -> None:
        if self._daemons.get("slurmctld") and self._daemons["slurmctld"].poll() is None:
            self.cancel_all()
        # a job step's slurmstepd outlives its slurmd: stop every process left on the nodes (not slurmctld's
        # own helper, slurmscriptd: slurmctld would wait for it)
        for ns in self.netns[1:]:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in map(int, pids):
                if pid not in {p.pid for p in self._daemons.values()}:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for proc in self._daemons.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._daemons.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        munged = _pid(self.munge_dir / "munged.pid")
        if _alive(munged):
            os.kill(munged, signal.SIGTERM)
        shutil.rmtree(self.root, ignore_errors=True)

    def node_pids(self, name: str) -> list[int]:
        ns = self.netns[1 + self.NODES.index(name)]
        return [int(p) for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]

    def leftovers(self, wait: float = 15) -> list[str]:
        """Processes still running on the nodes besides slurmd (what a finished job left behind)."""
        deadline = time.time() + wait
        while True:
            found = []
            for name in self.NODES:
                for pid in self.node_pids(name):
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        continue
                    if pid != self._daemons[name].pid:
                        found.append(f"{name} {pid}: {cmd[:200]}")
            if not found or time.time() > deadline:
                return found
            time.sleep(0.5)

    def node_command(self, name: str, cmd: list[str], cwd: Path, **popen) -> subprocess.Popen:
        """`cmd` in folder `cwd` on node `name` (its network, hostname and /etc/hosts), outside SLURM."""
        pid = str(self._daemons[name].pid)
        return subprocess.Popen(["nsenter", "-t", pid, "--net", "--uts", "--mount", f"--wd={cwd}", "--", *cmd], **popen)

    def _slurm_conf(self) -> str:
        conf = super()._slurm_conf()
        r = self.root
        conf = conf.replace(f"SlurmctldHost={self.host}\n", f"SlurmctldHost={self.host}({self.ctld_addr})\n")
        conf = conf.replace(f"SlurmdSpoolDir={r / 'spool'}\n", f"SlurmdSpoolDir={r / 'spool'}/%n\n")
        conf = conf.replace(f"SlurmdPidFile={self._pidfiles['slurmd']}\n", f"SlurmdPidFile={r}/slurmd.%n.pid\n")
        conf = conf.replace(f"SlurmdLogFile={r / 'log' / 'slurmd.log'}\n", f"SlurmdLogFile={r}/log/slurmd.%n.log\n")
        head, _, _ = conf.partition("NodeName=")
        nodes = "".join(f"NodeName={n} NodeHostname={n} NodeAddr={a} CPUs={self.cpus} State=UNKNOWN\n"
                        for n, a in self.addr.items())
        return head + nodes + f"PartitionName=debug Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE State=UP\n"
