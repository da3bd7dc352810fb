# The README's two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck check bench soak clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The demo runs DURATION seconds (default 12, plus start and stop); Ctrl-C stops it earlier.
DURATION ?=
run: $(STAMP)
	$(BIN)/python -m cpmgr.demo --config config/local.yaml $(if $(DURATION),--duration $(DURATION))

test: $(STAMP)
	bash .ci/ensure-promtool
	$(BIN)/ruff check cpmgr tests
	$(BIN)/ruff format --check cpmgr tests
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check cpmgr tests

typecheck: $(STAMP)
	$(BIN)/mypy

# Every performance goal, PASS/FAIL against same-run baselines, in under 5 minutes.
bench: $(STAMP)
	$(BIN)/python bench/run.py

# A real `cpmgr run` under 10% faults for 10 minutes (MINUTES=1 to shorten); not part of test.
MINUTES ?= 10
soak: $(STAMP)
	$(BIN)/python bench/soak.py --minutes $(MINUTES)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
