# The two commands of the README. Each one installs what it needs first (pinned by
# constraints.txt: the small CPU build of PyTorch), so a fresh machine needs nothing else.
PYTHON ?= python3

.PHONY: install demo demo-train test model

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

# Retrain the shipped models from scratch: B1 at the `long` budget (about 2 hours on 2 quiet
# CPU cores; needs the Debian package dataset-fashion-mnist), then models/ from its runs, scored
# with their Ex-PDE prior for the model card.
model: install
	$(PYTHON) benchmarks/speed_quality.py --budget long --work runs/speed_quality-long
	$(PYTHON) benchmarks/ship_model.py --results benchmarks/results/speed_quality_long.json
	$(PYTHON) benchmarks/ex_pde.py --results benchmarks/results/speed_quality_long.json
	$(PYTHON) benchmarks/ship_model.py --results benchmarks/results/speed_quality_long.json --card-only
