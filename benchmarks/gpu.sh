#!/usr/bin/env bash
# One call on a lent GPU machine (no network; its image holds torch, triton, pytest,
# pytest-benchmark, pytest-xdist, ninja, nvcc and safetensors under `python3`): builds the
# extension, runs the tests on CUDA and the GPU benchmark set, and writes the GPU's gate baseline,
# all under $OUT (8 files), within 450 s: each step's time limit is cut to what is left of that.
# The kernels' configurations are tuned by timing on first use and the choices kept in
# $OUT/tuning.json, shared by the steps: the tests (12 processes) compile and time most of them,
# so the benchmarks mostly find theirs made.
# Steps get SIGINT at their limit, so pytest still reports what ran, pytest-benchmark writes what
# it measured, and an interrupted extension build releases its lock.
#   bash benchmarks/gpu.sh            (the device tool's `run` sets $OUT; give it timeout_s >= 520)
#   bash benchmarks/gpu.sh compile    only the torch.compile provider's benchmarks (with eager beside
#                                     them): their compile time, tens of seconds per case, does not fit
set -u
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$repo/gpu-results}"
only_compile="$([ "${1:-}" = compile ] && echo yes)"
py=python3
deadline=450
mkdir -p "$out"

limited() {  # limited SECONDS command...: run with the lesser of SECONDS and what is left
  local cap=$1 left=$((deadline - SECONDS))
  shift
  [ "$left" -lt "$cap" ] && cap=$left
  [ "$cap" -le 0 ] && { echo "skipped: no time left"; return 124; }
  timeout -s INT -k 10 "$cap" "$@"
}

# The package as it installs (kernels/ -> engine/kernels, ...), without pip: the machine has no network.
stage="$(mktemp -d)"
cp -r "$repo/engine" "$stage/engine"
cp -r "$repo/kernels" "$stage/engine/kernels"
cp -r "$repo/benchmarks" "$stage/engine/benchmarks"
cp -r "$repo/csrc" "$stage/engine/csrc"
export PYTHONPATH="$stage" ENGINE_STRICT=1 ENGINE_EXT_DIR="$stage/ext" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  ENGINE_TUNING_CACHE="$out/tuning.json"
cd "$stage"  # so the repository's engine/ (without kernels/) does not shadow the staged package

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  limited 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  limited 60 "$py" - <<'PY'
import platform, torch, triton, pytest, pytest_benchmark
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "pytest", pytest.__version__, "pytest-benchmark", pytest_benchmark.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
from engine.benchmarks.gate import device_class
print("device class", device_class())
PY
  echo "ninja $(ninja --version)"
  echo
  limited 120 "$py" -m engine build-ext  # the extension compiles once, before the tests use it
  echo "build-ext exit code $?"
} > "$out/setup.txt" 2>&1
device_class="$(sed -n 's/^device class //p' "$out/setup.txt")"

if [ -z "$only_compile" ]; then
  # Kernels, ops, modules, the optimizer and torch.compile (Inductor over the triton_ops) on CUDA;
  # Triton compiles each kernel variant on first use (hundreds of variants, about a second each),
  # so the tests run in 12 processes with pytest-xdist.
  workers=$("$py" -c 'import xdist' 2>/dev/null && echo "-n 12")
  limited 180 "$py" -m pytest "$repo/tests/kernels" "$repo/tests/ops" "$repo/tests/nn" "$repo/tests/optim" \
    "$repo/tests/test_compile.py" -c "$repo/pyproject.toml" --rootdir "$repo" -q -p no:cacheprovider $workers -rfE \
    --ignore "$repo/tests/kernels/test_cross_compile.py" > "$out/tests.txt" 2>&1
  echo "tests exit code $?" >> "$out/tests.txt"
  select="not compile"
else
  select="compile or eager"  # eager beside it: the ratios are to eager measured in the same run
fi

# The GPU size set of the benchmarks; correctness is checked before each timing.
limited 170 "$py" -m engine bench --size gpu --select "$select" --max-time 0.2 --out "$out" > "$out/bench.txt" 2>&1
echo "bench exit code $?" >> "$out/bench.txt"

# This GPU's gate baseline from that run (counters with the kernels on CUDA, floors from its ratios).
bench_json="$(ls -t "$out"/bench-cuda-*.json 2>/dev/null | head -1)"
if [ -z "$only_compile" ] && [ -n "$bench_json" ] && [ -n "$device_class" ]; then
  limited 60 "$py" -m engine gate --update --bench-json "$bench_json" --baseline "$out/$device_class.json" \
    > "$out/gate.txt" 2>&1
  echo "gate exit code $?" >> "$out/gate.txt"
fi
echo "total ${SECONDS} s"
ls -la "$out"
