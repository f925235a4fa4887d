# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONSTR  := constraints/dev.txt

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml $(CONSTR)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTR) torch torchvision
	$(BIN)/pip install -q -c $(CONSTR) -e ".[vision,report,hf,examples,onnx,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m adaprune.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=10

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info src/*.egg-info
