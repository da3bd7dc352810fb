# The README's two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Two stamps: `make run` needs only the runtime dependencies, `make test` the dev extras too.
RUN_STAMP := $(VENV)/.installed-run
STAMP     := $(VENV)/.installed
# Test tools that are not Python packages (.ci/ensure-tools unpacks them here, gitignored).
TOOLS_BIN := $(CURDIR)/.cache/tools/bin
TEST_ENV  := PATH="$(TOOLS_BIN):$(CURDIR)/$(BIN):$$PATH"

.PHONY: run test check tools lint typecheck bench soak clean venv

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(RUN_STAMP) $(STAMP)

# The demo runs DURATION seconds (default 12, plus start and stop); Ctrl-C stops it earlier.
DURATION ?=
run: $(RUN_STAMP)
	$(BIN)/python -m cpmgr.demo --config config/local.yaml $(if $(DURATION),--duration $(DURATION))

# promtool, prometheus and kustomize for the tests, without installing anything system-wide.
tools:
	bash .ci/ensure-tools

# Two pytest workers: most of the long tests wait on timers and real daemons, not on a core,
# so two at a time halve the run on a 2-core machine. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: $(STAMP) tools
	$(BIN)/ruff check cpmgr tests
	$(BIN)/ruff format --check cpmgr tests
	$(BIN)/mypy
	$(TEST_ENV) $(BIN)/pytest -q -n $(TEST_WORKERS)

# Everyday work: lint, types and the fast tests (no real daemons, Prometheus or demo), < 60 s.
CHECK_TESTS := tests/test_protocol.py tests/test_protocol_answers.py tests/test_store.py \
	tests/test_signer.py tests/test_config.py tests/test_batch.py tests/test_journal.py \
	tests/test_clientcli.py tests/test_cli.py tests/test_deploy_manifests.py \
	tests/test_membership_rules.py tests/test_emulator_state.py tests/test_client_core.py
check: $(STAMP)
	$(BIN)/ruff check cpmgr tests
	$(BIN)/ruff format --check cpmgr tests
	$(BIN)/mypy
	$(TEST_ENV) $(BIN)/pytest -q -x -p no:randomly $(CHECK_TESTS)

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
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis .cache
