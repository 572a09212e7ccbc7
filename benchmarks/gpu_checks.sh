#!/usr/bin/env bash
# The GPU checks in one call of a lent GPU machine: the CUDA tests (pytest -m cuda), then B2 on
# the GPU (benchmarks/throughput.py --device cuda), their results copied to $OUT (at most 8
# files: the throughput JSON and markdown, the logs, the test report, the GPU's description).
#
#   bash benchmarks/gpu_checks.sh                        # on the GPU machine, from the repo root
#   GPU_CHECKS_CPU=1 OUT=/tmp/gc bash benchmarks/gpu_checks.sh   # the same path without a GPU:
#                        # the CUDA tests skip, throughput.py runs --budget gpu-smoke --device cpu
#
# On the GPU machine the package is installed with --no-deps (its dependencies are there,
# except diffusers, the benchmark's peer: carry its wheels in .whl/, see benchmarks/README.md).
# Time: the tests get TEST_SECONDS (240), the benchmark BENCH_SECONDS (330): one device call of
# at most 10 minutes with the install and the start.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the folder the results go to}
CPU=${GPU_CHECKS_CPU:-}
TEST_SECONDS=${TEST_SECONDS:-240}
BENCH_SECONDS=${BENCH_SECONDS:-330}
[ -n "$CPU" ] && BENCH_SECONDS=${GPU_CHECKS_CPU_SECONDS:-3000}  # a shared CPU: no device clock
WORK=$(mktemp -d /tmp/gpu_checks.XXXXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ -z "$CPU" ]; then
  if compgen -G ".whl/*.whl" > /dev/null; then  # carried wheels (diffusers), beside the image's
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "the carried wheels did not install"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1 \
    || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # else straight from the tree
fi

{ if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  else echo "no nvidia-smi"; fi
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
} > "$WORK/gpu.txt"
cat "$WORK/gpu.txt"

status=0
timeout "$TEST_SECONDS" python3 -m pytest -m cuda -q -rs -p no:cacheprovider \
  --junitxml "$WORK/cuda_tests.xml" tests/test_cuda.py tests/core/test_inversion.py \
  > "$WORK/cuda_tests.log" 2>&1 || status=1
tail -n 15 "$WORK/cuda_tests.log"

if [ -n "$CPU" ]; then
  bench=(--budget gpu-smoke --device cpu --threads 1)
else
  bench=(--budget gpu --device cuda)
fi
timeout "$BENCH_SECONDS" python3 benchmarks/throughput.py "${bench[@]}" --out "$WORK" \
  > "$WORK/throughput.log" 2>&1 || status=1
tail -n 25 "$WORK/throughput.log"

for f in throughput_cuda.json throughput_cuda.md throughput.log cuda_tests.log cuda_tests.xml \
         gpu.txt; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
done
rm -rf "$WORK"
echo "gpu_checks: exit status $status; results in $OUT"
exit $status
