#!/usr/bin/env bash
# The GPU test files on the GPU machine (run through the `device` tool from the repository root,
# wheels for the packages that machine lacks carried in .whl/):
#   bash bench/gpu_tests.sh [FILE ...]        (default: every GPU test file)
# One log per file under $OUT (or bench/results/gpu-tests-local), summary lines printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-tests-local}"
mkdir -p "$OUT"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || exit 1
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
files=("$@")
[[ ${#files[@]} -gt 0 ]] || files=(tests/test_kernels_gpu.py tests/test_gpu_model.py tests/test_transfer_gpu.py tests/test_parallel_gpu.py tests/test_gpu_pd.py)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
# (the commit is not read here: the device copy of the tree carries no current git metadata)
for f in "${files[@]}"; do
  name="$(basename "$f" .py)"
  timeout "${PER_FILE_S:-500}" python3 -m pytest -q -p no:cacheprovider -m gpu "$f" >"$OUT/$name.log" 2>&1
  echo "$name: $(tail -n 1 "$OUT/$name.log")" | tee -a "$OUT/summary.txt"
done
echo "==== summary"; cat "$OUT/summary.txt"
