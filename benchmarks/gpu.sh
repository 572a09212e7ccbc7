#!/usr/bin/env bash
# B1 on the lent GPU, in ONE device call of at most 9 minutes (benchmarks/README.md):
#
#   device run:  command "bash benchmarks/gpu.sh", carry [".carry"], timeout_s 600
#
# Before the call, here (once): put the Fashion-MNIST IDX files in the ignored folder .carry/
#   mkdir -p .carry/fashion-mnist && cp /usr/share/datasets/fashion-mnist/* .carry/fashion-mnist/
# The GPU machine has torch and the core dependencies but not this package: it is installed
# with --no-deps. What comes back (at most 8 files, each under 16 MiB) lands in $OUT:
#   speed_quality_gpu.{json,md,png}, grids.tar.gz (the sample grids), log.txt, and the trained
#   runs exported (`diffusevae export`: EMA weights as the weights, configs, manifests, logs;
#   no trainer state) in two archives under 16 MiB each: models_form2.tar.gz (the model to
#   ship) and models_baselines.tar.gz (the others; form1 without its VAE, form2's copy).
# Then, here:  mkdir -p /tmp/b1-runs && tar -xzf OUT/models_form2.tar.gz -C /tmp/b1-runs &&
#   tar -xzf OUT/models_baselines.tar.gz -C /tmp/b1-runs && python benchmarks/ship_model.py \
#   --results benchmarks/results/speed_quality_gpu.json --runs /tmp/b1-runs
# Path test on the CPU at a tiny size:  OUT=/tmp/out BUDGET=smoke DEVICE=cpu bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that comes back}
BUDGET=${BUDGET:-gpu}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-.carry/fashion-mnist}
WORK=${WORK:-/tmp/b1-work}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
rm -rf "$WORK" /tmp/b1-results
set -o pipefail
python3 benchmarks/speed_quality.py --budget "$BUDGET" --device "$DEVICE" --data-dir "$DATA" \
    --out /tmp/b1-results --work "$WORK" --quiet 2>&1 | tee "$OUT/log.txt"
stem=speed_quality_$BUDGET
[ "$BUDGET" = smoke ] && stem=speed_quality
cp /tmp/b1-results/"$stem".{json,md,png} "$OUT"/
tar -czf "$OUT/grids.tar.gz" -C /tmp/b1-results $(cd /tmp/b1-results && ls "$stem"_grid_*.png)
# the trained runs, exported; B1 copies one VAE into every run, so form1's is not sent again
EXPORTS=/tmp/b1-export
rm -rf "$EXPORTS"
for run in "$WORK"/runs/*; do
    python3 -m diffusevae export --run "$run" --out "$EXPORTS/$(basename "$run")" >/dev/null
done
tar -czf "$OUT/models_form2.tar.gz" -C "$EXPORTS" diffusevae-form2
others=$(cd "$EXPORTS" && ls | grep -vx diffusevae-form2)
tar -czf "$OUT/models_baselines.tar.gz" -C "$EXPORTS" --exclude=diffusevae-form1/vae $others
ls -l "$OUT"
