#!/usr/bin/env bash
# One call on a lent GPU machine (torch and triton already installed there, no network): runs the
# tests on CUDA, then the GPU benchmark set, and writes everything under $OUT. Aim: under 8 minutes.
#   bash benchmarks/gpu.sh            (the device tool's `run` sets $OUT)
set -u
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$repo/gpu-results}"
mkdir -p "$out"

# The package as it installs (kernels/ -> engine/kernels, ...), without pip: the machine has no network.
stage="$(mktemp -d)"
cp -r "$repo/engine" "$stage/engine"
cp -r "$repo/kernels" "$stage/engine/kernels"
cp -r "$repo/benchmarks" "$stage/engine/benchmarks"
cp -r "$repo/csrc" "$stage/engine/csrc"
export PYTHONPATH="$stage" ENGINE_STRICT=1 ENGINE_EXT_DIR="$stage/ext" HF_HUB_OFFLINE=1
cd "$stage"  # so the repository's engine/ (without kernels/) does not shadow the staged package

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python - <<'PY'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
PY
} > "$out/versions.txt" 2>&1

# Kernels, ops, modules and the optimizer on CUDA (the extension compiles first, once).
timeout 90 python -m engine build-ext > "$out/build-ext.txt" 2>&1
timeout 150 python -m pytest "$repo/tests/kernels" "$repo/tests/ops" "$repo/tests/nn" "$repo/tests/optim" \
  -c "$repo/pyproject.toml" --rootdir "$repo" -q -p no:cacheprovider --junitxml="$out/tests.xml" \
  > "$out/tests.txt" 2>&1
echo "tests exit code $?" >> "$out/tests.txt"

# The GPU size set of every benchmark; correctness is checked before each timing.
timeout 200 python -m engine bench --size gpu --max-time 0.2 --out "$out" > "$out/bench.txt" 2>&1
echo "bench exit code $?" >> "$out/bench.txt"
ls -la "$out"
