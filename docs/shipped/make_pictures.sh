#!/usr/bin/env bash
# Makes the pictures of the shipped model (docs/shipped/*.png, shown in README.md and
# docs/inversion.md) again, with the command line alone: 64 samples with the model's sampling
# defaults (`diffusevae sample --run MODEL --n 64`, no other flag), `make demo`'s four pictures, one
# real-image edit of four example test images along the Trouser direction, without and with
# DDIM inversion, and the explorer's page.
#
#   bash docs/shipped/make_pictures.sh [MODEL]      # MODEL: models/fashion-mnist
#
# About three minutes on a 2-core CPU. Run it after the shipped model changes.
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-models/fashion-mnist}
dest=docs/shipped
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m diffusevae sample --run "$model" --n 64 --out "$work/samples"
cp "$work/samples/grid.png" "$dest/samples.png"
python -m diffusevae demo --model "$model" --out "$work/demo" --quiet
cp "$work/demo/samples/stages.png" "$dest/stages.png"
cp "$work/demo/reconstructions/grid.png" "$dest/reconstructions.png"
cp "$work/demo/interpolation/grid.png" "$dest/interpolation.png"
cp "$(ls "$work"/demo/edit/*.png | grep -v _x_hat.png)" "$dest/edit.png"  # the refined grid

# a pullover with a logo, a shirt, a dress and a T-shirt from the model's examples
mkdir "$work/four"
for name in 0001_pullover 0004_shirt 0013_dress 0019_t-shirt; do
    cp "$model/examples/$name.png" "$work/four/"
done
edit=(edit --run "$model" --input "$work/four" --attribute Trouser
      --lambdas=-4,-2,-1,0,1,2,4 --steps 50 --sampler ddim)
python -m diffusevae "${edit[@]}" --out "$work/fresh"
python -m diffusevae "${edit[@]}" --invert --out "$work/inverted"
cp "$work/fresh/Trouser.png" "$dest/edit_real_fresh.png"
cp "$work/inverted/Trouser.png" "$dest/edit_real_inverted.png"
echo "wrote $dest/{samples,stages,reconstructions,interpolation,edit,edit_real_fresh,edit_real_inverted}.png"

# the explorer's page in a headless Chromium (needs the `app` extra and chromium-driver)
if python -c "import gradio, selenium" 2>/dev/null && command -v chromedriver >/dev/null; then
    python tests/app/test_explorer.py --run "$model" --out docs/explorer.png
else
    echo "docs/explorer.png not made: it needs the app extra, selenium and chromium-driver"
fi
