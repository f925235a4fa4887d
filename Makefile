# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONSTR  := constraints/dev.txt

.PHONY: demo test lint bench readme clean

$(STAMP): pyproject.toml $(CONSTR)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTR) torch torchvision
	$(BIN)/pip install -q -c $(CONSTR) -e ".[vision,report,hf,examples,onnx,ray,search,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m adaprune.demo

# The report test opens report.html in headless Chromium: install Debian's chromium when it is missing
# and we may (root with apt-get); otherwise that one test skips and says why.
test: $(STAMP)
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium for the report's browser test ..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "chromium could not be installed: the browser test will be skipped"; \
	fi
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not timing" --durations=10
	$(BIN)/python -m pytest -q -m timing

# Benchmarks (CPU, single thread; tens of minutes): results in benchmarks/results/*.json, then
# docs/benchmarks.md regenerated from them. Narrow the grids with e.g. ACC_ARGS="--fresh --budgets 8 16 --recovery 2".
ACC_ARGS    ?= --fresh
SPEED_ARGS  ?=
ENGINE_ARGS ?=

bench: $(STAMP)
	$(BIN)/python benchmarks/accuracy.py $(ACC_ARGS)
	$(BIN)/python benchmarks/speedup.py $(SPEED_ARGS)
	$(BIN)/python benchmarks/speedup.py --size 224 --batches 1 --repeats 10 --out speedup224 $(SPEED_ARGS)
	$(BIN)/python benchmarks/engine.py $(ENGINE_ARGS)
	$(BIN)/python benchmarks/make_doc.py

# README's demo table, generated from the current code: runs the demo's comparison once (about 30 s) and
# rewrites the block between <!-- demo-table:start --> and <!-- demo-table:end --> in README.md.
readme: $(STAMP)
	$(BIN)/python benchmarks/readme.py

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info src/*.egg-info
