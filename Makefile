# The two commands of the README. Each one installs what it needs first (pinned by
# constraints.txt: the small CPU build of PyTorch), so a fresh machine needs nothing else.
PYTHON ?= python3

.PHONY: install demo demo-train test model model-b1

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,fid,plot]'

# A tour of the shipped model (models/fashion-mnist): samples, reconstructions, an
# interpolation and an edit, in diffusevae-outputs/demo/ (about a minute on a CPU).
demo: install
	$(PYTHON) -m diffusevae demo

# The former demo: both stages trained briefly on scikit-learn's digits (about 5 minutes).
demo-train: install
	$(PYTHON) -m diffusevae demo --train

test: install
	$(PYTHON) -m pytest -q

# Retrain the shipped models from scratch with the recipe of their cards: 12 epochs of each stage
# (11,244 optimiser steps at batch 64), about 9 hours on 2 quiet CPU cores; needs the Debian
# package dataset-fashion-mnist. Every step resumes where it stopped, so after an interruption
# run `make model` again. Then score the new models against the ones shipped now
# (benchmarks/long_run.py) and write models/ from them: EMA weights, the Ex-PDE prior, the
# directions, the examples, the cards and the sampling defaults of the best cell.
# `make model-b1` retrains the one-epoch model of B1 (benchmarks/speed_quality.py) instead.
RUNS ?= runs/shipped
RECIPE = --preset fashion-mnist --epochs 12 --lr 5e-4 --ema-decay 0.999 --ckpt-every 500 \
         --sample-every 2000 --seed 0 --resume --quiet
REFINER = $(RECIPE) --warmup-steps 200 --lr-schedule constant --min-snr-gamma 5 \
          --batch-size 64 --set unet.num_res_blocks=1 --set unet.dropout=0.0

model: install
	$(PYTHON) -m diffusevae train-vae --run $(RUNS)/run $(RECIPE) --kl-weight 0.1
	$(PYTHON) -m diffusevae train-refiner --run $(RUNS)/run --form form2 $(REFINER)
	$(PYTHON) -m diffusevae train-refiner --run $(RUNS)/uncond --form uncond $(REFINER)
	$(PYTHON) benchmarks/ship_model.py --form2-run $(RUNS)/run --uncond-run $(RUNS)/uncond \
	    --no-card --models $(RUNS)/models
	$(PYTHON) benchmarks/long_run.py --quiet \
	    --model shipped models/fashion-mnist models/fashion-mnist-uncond \
	    --model retrained $(RUNS)/models/fashion-mnist $(RUNS)/models/fashion-mnist-uncond
	rm -rf models/fashion-mnist models/fashion-mnist-uncond
	cp -r $(RUNS)/models/fashion-mnist $(RUNS)/models/fashion-mnist-uncond models/
	$(PYTHON) benchmarks/ship_model.py --from-long-run benchmarks/results/long_run.json --card-only

model-b1: install
	$(PYTHON) benchmarks/speed_quality.py --budget long --work runs/speed_quality-long
	$(PYTHON) benchmarks/ship_model.py --results benchmarks/results/speed_quality_long.json
	$(PYTHON) benchmarks/ex_pde.py --results benchmarks/results/speed_quality_long.json
	$(PYTHON) benchmarks/ship_model.py --results benchmarks/results/speed_quality_long.json --card-only
