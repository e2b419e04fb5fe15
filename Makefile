# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv and install the CPU build of torch *before* the package, so pip never pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: venv demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/medsynth demo --workdir demo

# -n auto: one pytest worker per core (tests pin torch to one thread each, so two cores run two tests).
test: venv
	$(PY) -m pytest -q -n auto

lint: venv
	$(PY) -m ruff check medsynth tests data_prep benchmarks

clean:
	rm -rf $(VENV) demo runs
