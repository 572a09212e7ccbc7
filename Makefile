# The two commands of the README. Each one installs what it needs first (pinned by
# constraints.txt: the small CPU build of PyTorch), so a fresh machine needs nothing else.
PYTHON ?= python3

.PHONY: install demo test

install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,fid,plot]'

demo: install
	$(PYTHON) -m diffusevae demo

test: install
	$(PYTHON) -m pytest -q
