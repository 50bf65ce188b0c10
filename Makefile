# make demo: venv + install + the transfer demo + frontier.   make test: venv + install + the full suite (CI).
# make test-fast: everything but the real-Ray tests, for the inner loop.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= $(CURDIR)/runs

.PHONY: demo demo-long smoke demo-plot test test-fast install browser bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@echo "installing detsweep and its pinned dependencies into $(VENV) (pip log: $(VENV)/pip.log)"
	$(PY) -m pip install --disable-pip-version-check -e '.[dev]' > $(VENV)/pip.log 2>&1 || (tail -30 $(VENV)/pip.log; exit 1)
	$(PY) -c "import detsweep, torch, ray, pycocotools"
	touch $(STAMP)

install: $(STAMP)

# The transfer demo: two bases pretrained once on the synthetic source domain (cached in
# $(DEMO_OUT)/_bases, reused by the next `make demo`), fine-tuned on the target domain by every regime.
demo: $(STAMP)
	$(PY) -m detsweep.run sweeps/demo.yaml --output-dir $(DEMO_OUT) --fresh -q
	$(PY) -m detsweep.frontier $(DEMO_OUT)/demo/results.parquet

# The long demo (≈ 3 h 15 min on 2 cores the first time, 9 min with its bases cached): DETR's base
# started from the Faster R-CNN base's backbone and trained until it leaves DETR's plateau, then
# fine-tuned on the target domain by every regime.
demo-long: $(STAMP)
	$(PY) -m detsweep.run sweeps/demo_long.yaml --output-dir $(DEMO_OUT) --fresh -q
	$(PY) -m detsweep.frontier $(DEMO_OUT)/demo_long/results.parquet

# The pipeline check: every regime and LoRA placement on tiny models, a few minutes.
smoke: $(STAMP)
	$(PY) -m detsweep.run sweeps/smoke.yaml --output-dir $(DEMO_OUT) --fresh -q
	$(PY) -m detsweep.frontier $(DEMO_OUT)/smoke/results.parquet

# The README's front plot: regenerated from a `make demo` run.
docs/demo_front.png: $(DEMO_OUT)/demo/frontier_ap_vs_trainable_params.png
	cp $< $@

$(DEMO_OUT)/demo/frontier_ap_vs_trainable_params.png:
	$(MAKE) demo

demo-plot: docs/demo_front.png

# The full suite in two passes: the Ray-free tests in $(TEST_JOBS) processes (pytest-xdist), then the real-Ray
# tests (exactly tests/ray/, see tests/conftest.py) in one; both always run, and the target fails if either failed.
TEST_JOBS ?= 2
test: $(STAMP) browser
	@status=0; \
	$(PY) -m pytest -q -ra -n $(TEST_JOBS) tests --ignore=tests/ray || status=$$?; \
	$(PY) -m pytest -q -ra tests/ray || status=$$?; \
	exit $$status

# Headless Chromium for the report.html browser test: Debian's package, installed when missing and this
# user may (root, as in CI); otherwise that one test skips and says why.
browser: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "installing chromium for the browser test (log: $(VENV)/apt.log)" && \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } \
	      > $(VENV)/apt.log 2>&1 || echo "chromium not installed: the report.html browser test will skip"; }

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -n $(TEST_JOBS) tests --ignore=tests/ray

bench: $(STAMP)
	$(PY) bench/frontier.py
	$(PY) bench/eval.py
	$(PY) bench/regimes.py
	$(PY) bench/detr_step.py
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
