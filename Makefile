# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first: the CPU build on disk; a later resolver would otherwise pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,nvflare,bundle]'
	touch $(STAMP)

install: $(STAMP)

# The demo's run folders are its own: they are replaced on every `make demo` (medfl itself never overwrites a run).
demo: $(STAMP)
	$(VENV)/bin/medfl synth
	$(VENV)/bin/medfl check site_configs/dermoscopy/*.yaml site_configs/prostate/*.yaml
	rm -rf runs/demo
	$(VENV)/bin/medfl run site_configs/experiments/dermoscopy.yaml --out runs/demo/dermoscopy
	$(VENV)/bin/medfl run site_configs/experiments/prostate.yaml --out runs/demo/prostate

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

# The import layers of docs/architecture.md (contracts in pyproject.toml; tests/test_layers.py runs them too).
lint: $(STAMP)
	$(VENV)/bin/ruff check medfl tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

# The config references in docs/ are generated from the pydantic models; a test fails while they are stale.
docs: $(STAMP)
	$(VENV)/bin/medfl config-reference --out docs

clean:
	rm -rf $(VENV) data/synth
