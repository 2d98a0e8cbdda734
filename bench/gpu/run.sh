#!/usr/bin/env bash
# The GPU tier in one call: tests/test_gpu.py (`pytest -m gpu`) under a time limit.
#
#   bench/gpu/run.sh               # build bench/gpu/.carry if missing (needs network), install it, run the tier
#   bench/gpu/run.sh --build-only  # just build bench/gpu/.carry (before carrying it to a GPU machine)
#
# Environment: PYTHON (the interpreter whose torch is used; default .venv/bin/python if present, else
# python3), GPU_TIER_TIMEOUT_S (limit of the pytest run, default 390), OUT (where results go;
# default bench/results), WHEEL_PYTHON (the Python a new carry is built for, default 3.12). On a GPU
# each test writes gpu_<name>.json and this script gpu_tier.json (outcomes, times), and a test that
# skips fails the tier; without CUDA every GPU test skips with its reason, nothing is written, exit 0.
# A PYTHON of another version than the carry's wheels is refused (exit 2) before anything is built.
#
# The GPU machine has torch, transformers, accelerate and pytest but no network and no DeepSpeed:
# the wheels it lacks (bench/gpu/carry.txt) travel in bench/gpu/.carry, git-ignored, built here.
# They are installed with --no-index into bench/gpu/.venv, an overlay venv that also sees every
# package of $PYTHON (its CUDA torch), so nothing of the machine's own environment is changed.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
CARRY=$REPO/bench/gpu/.carry
OVERLAY=$REPO/bench/gpu/.venv
WHEEL_PYTHON=${WHEEL_PYTHON:-3.12}     # the GPU machine's Python: compiled wheels are cp312
TIMEOUT_S=${GPU_TIER_TIMEOUT_S:-390}
RESULTS=${OUT:-$REPO/bench/results}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
started=$(date +%s)
log() { echo "[gpu-tier $(($(date +%s) - started))s] $*"; }

build_carry() {
    log "building $CARRY from bench/gpu/carry.txt (needs network)"
    rm -rf "$CARRY.tmp" && mkdir -p "$CARRY.tmp"
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-cache-dir -w "$CARRY.tmp" \
        "$(grep -E '^deepspeed==' "$REPO/bench/gpu/carry.txt")"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$WHEEL_PYTHON" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$CARRY.tmp" -r <(grep -vE '^(deepspeed==|#|$)' "$REPO/bench/gpu/carry.txt")
    (cd "$CARRY.tmp" && ls -1 *.whl > MANIFEST && echo "python $WHEEL_PYTHON" >> MANIFEST)
    rm -rf "$CARRY" && mv "$CARRY.tmp" "$CARRY"
}

# The carry's compiled wheels (pydantic-core, msgpack, psutil, pyyaml) install on one Python version
# only: refuse any other now, or DeepSpeed would be missing and its tests could not run.
if [ "${1:-}" != "--build-only" ]; then
    python_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ||
        { echo "error: cannot run PYTHON=$PYTHON; pass PYTHON=<a Python with torch>" >&2; exit 2; }
    carry_python=$(sed -n 's/^python //p' "$CARRY/MANIFEST" 2>/dev/null || true)
    carry_python=${carry_python:-$WHEEL_PYTHON}
    if [ "$python_version" != "$carry_python" ]; then
        echo "error: the carried wheels ($CARRY, from bench/gpu/carry.txt) are for Python $carry_python, but PYTHON=$PYTHON is" \
             "Python $python_version: DeepSpeed's compiled dependencies would not install and the DeepSpeed" \
             "tests could not run. Run with PYTHON=<a Python $carry_python with torch>, or build a carry for" \
             "this one: rm -rf $CARRY && WHEEL_PYTHON=$python_version bench/gpu/run.sh --build-only" >&2
        exit 2
    fi
fi

if [ ! -f "$CARRY/MANIFEST" ]; then
    build_carry || { echo "error: could not build $CARRY; build it where there is network" \
                          "(bench/gpu/run.sh --build-only) and carry that folder here" >&2; exit 2; }
fi
carry_bytes=$(du -sb "$CARRY" | cut -f1)
log "carry: $(awk "BEGIN { printf \"%.1f\", $carry_bytes / 1048576 }") MiB in $(grep -c '\.whl$' "$CARRY/MANIFEST") wheels"
[ "${1:-}" = "--build-only" ] && exit 0

# Overlay venv: its own site-packages first, then every site dir $PYTHON sees (added with
# site.addsitedir, so their .pth files, e.g. editable installs, work too). Rebuilt when the base
# interpreter or the carry changes.
stamp="$("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])') $(cksum < "$CARRY/MANIFEST")"
if [ "$(cat "$OVERLAY/.stamp" 2>/dev/null)" != "$stamp" ]; then
    log "overlay venv $OVERLAY on $PYTHON"
    "$PYTHON" -m venv --clear --without-pip "$OVERLAY"
    base_sites=$("$PYTHON" -c 'import sys; print([p for p in sys.path if p.endswith(("site-packages", "dist-packages"))])')
    purelib=$("$OVERLAY/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "import site; list(map(site.addsitedir, $base_sites))" > "$purelib/_base_interpreter.pth"
    "$OVERLAY/bin/python" -m pip --version > /dev/null ||
        { echo "error: no pip importable from $PYTHON; install pip there or pass PYTHON=<python with torch and pip>" >&2; exit 2; }
    # only what is missing or too old is installed; the machine's own pip config is ignored (offline)
    if env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
        "$OVERLAY/bin/python" -m pip install -q --no-index --find-links "$CARRY" \
        "$(grep -E "^deepspeed==" "$REPO/bench/gpu/carry.txt")" pytest-timeout nvidia-ml-py; then
        echo "$stamp" > "$OVERLAY/.stamp"
    else
        log "error: installing from the carry failed (above); the tier runs, and its DeepSpeed tests fail"
    fi
fi
PY=$OVERLAY/bin/python
"$PY" -c 'import torch, deepspeed; print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, deepspeed {deepspeed.__version__}")' 2>&1 | tail -1 || true

mkdir -p "$RESULTS"
report=$(mktemp -d)/junit.xml
log "pytest -m gpu tests/test_gpu.py (limit ${TIMEOUT_S}s), results to $RESULTS"
set +e
GPU_TIER_RESULTS=$RESULTS PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} timeout -k 15 "$TIMEOUT_S" \
    "$PY" -m pytest -m gpu tests/test_gpu.py -v -rs -p no:cacheprovider --junitxml="$report" 2>&1 | tee "$report.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    log "pytest ran past ${TIMEOUT_S}s and was stopped; the finished tests' results are kept"
fi
if [ -n "${OUT:-}" ]; then cp "$report.log" "$OUT/gpu_tier.log"; fi

"$PY" - "$report" "$RESULTS" "$rc" "$(($(date +%s) - started))" "$carry_bytes" <<'EOF'
"""Summarize the junit report; on a GPU write gpu_tier.json and fail on any skip (something the tier
needs is missing), on CPU check every test skipped."""
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
import torch
report, results, rc, seconds, carry = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tests = []
if Path(report).is_file():
    for case in ET.parse(report).iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        reason = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
        tests.append({"test": case.get("name"), "outcome": kind, "seconds": float(case.get("time", 0)), "reason": reason[:300]})
counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failure", "error", "skipped")}
print(f"[gpu-tier] pytest exit {rc}, {seconds}s in all, carry {carry / 2**20:.1f} MiB: {counts}")
if torch.cuda.is_available():
    summary = {"pytest_exit": rc, "seconds": seconds, "carry_bytes": carry, "gpu": torch.cuda.get_device_name(),
               "torch": torch.__version__, "counts": counts, "tests": tests}
    (results / "gpu_tier.json").write_text(json.dumps(summary, indent=2) + "\n")
    skipped = [f"{t['test']}: {t['reason']}" for t in tests if t["outcome"] == "skipped"]
    if skipped:
        sys.exit("error: with CUDA no GPU test may skip (the tier would pass without it):\n  " + "\n  ".join(skipped))
elif not tests or counts["skipped"] != len(tests):
    sys.exit("error: without CUDA every GPU test must skip, got " + json.dumps(counts))
EOF
exit "$rc"
