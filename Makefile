# pingu-dask developer and demo entry points.
#
#   make demo    set up .venv (if needed) and run the bundled demo
#   make test    set up .venv (if needed), lint, and run the whole test suite (CI)
#   make test-fast  lint and the quick tier only (no real inference, SLURM or browser)
#
# TORCH chooses the torch build installed *before* the project (pip install arguments).
# The default is plain `torch==2.13.0`: on this project's CI machines pip finds the CPU
# build in a local wheel folder first (small venv, fast install; its PyPI torchvision
# cannot import, which pingu-dask never needs), but from PyPI on any other Linux
# machine it is a multi-GB CUDA build. A CPU build anywhere comes from PyTorch's CPU
# wheel index:
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# For a CUDA build, e.g.:
#   make setup TORCH="torch==2.14.1 torchvision==0.29.1"
# Whatever was installed is then pinned with a constraints file so that installing
# the project cannot swap it for another build.

PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pingu-installed
PIN    := $(VENV)/torch-constraint.txt
DEMO_OUT ?= demo_out

.PHONY: setup demo test test-fast lint clean-demo slurm-up slurm-down

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(PIN)
	$(BIN)/pip install -q --disable-pip-version-check -c $(PIN) -e '.[test]'
	# nnU-Net v1, for tests/test_convert_v1.py only (its network module; none of its
	# dependencies, some of which no longer build): the reference the v1 import is checked against.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps nnunet==1.7.1
	$(BIN)/python scripts/check_torch.py $(PIN)
	touch $(STAMP)

demo: setup
	$(BIN)/pingu-dask demo $(DEMO_OUT)

lint: setup
	$(BIN)/ruff check pingu_dask tests scripts
	$(BIN)/ruff format --check pingu_dask tests scripts
	$(BIN)/mypy

# The SLURM tests need a running SLURM: the testbed is started first (as root; it
# installs the Debian packages slurmctld, slurmd, slurm-client and munge on a fresh
# machine). It refuses to overwrite a /etc/slurm/slurm.conf or gres.conf it did not
# write (a machine with its own SLURM); PINGU_SLURM_TESTBED_FORCE=1 backs them up
# instead and `make slurm-down` restores them. The dashboard test needs headless
# Chromium and test_colin27 the Colin27 templates (Debian packages chromium and
# mricron-data, installed as root). If any cannot be had, make goes on and those tests
# fail saying why.
test: setup lint
	-scripts/install_chromium.sh
	-scripts/install_test_data.sh
	-scripts/slurm_testbed.sh start
	$(BIN)/pytest

# The quick tier: tests not marked slow (stand-in stages, hand-made volumes, the
# layers, the tiny model); the slow tier runs real nnU-Net, SLURM and Chromium.
test-fast: setup lint
	$(BIN)/pytest -m "not slow"

slurm-up:
	scripts/slurm_testbed.sh start

slurm-down:
	scripts/slurm_testbed.sh stop

clean-demo:
	rm -rf $(DEMO_OUT)
