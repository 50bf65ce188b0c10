# make demo: venv + install + smoke sweep + frontier.   make test: venv + install + tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= $(CURDIR)/runs

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m detsweep.run sweeps/smoke.yaml --output-dir $(DEMO_OUT)
	$(PY) -m detsweep.frontier $(DEMO_OUT)/smoke/results.parquet

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

bench: $(STAMP)
	$(PY) bench/frontier.py
	$(PY) bench/eval.py
	$(PY) bench/regimes.py
	$(PY) bench/detr_step.py
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
