# mlkit: two commands do everything on a fresh machine (`make demo`, `make test`); each bootstraps .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first, pinned, so that a CPU machine does not resolve a multi-GB CUDA build through the project's range.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.mlkit-installed
LAB_PORT ?= 8888

.PHONY: install demo test soak lab bench team nbdev-check clean-state

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

demo: $(STAMP)  ## train -> register -> promote -> build -> serve -> predict, on the embedded default
	$(BIN)/mlkit demo

test: $(STAMP)  ## nbdev discipline, nbdev-test, ruff, pytest (installs Debian's chromium when missing: the HTML render test)
	bash .ci/test

soak: $(STAMP)  ## the concurrency and crash tests, repeated: 20 rounds of 4 concurrent promotions, 10 of two team users (make test runs 3 each)
	MLKIT_SOAK_ROUNDS=$${MLKIT_SOAK_ROUNDS:-20} $(BIN)/python -m pytest -q tests/test_ledger.py -k "concurrent or crash"
	MLKIT_SOAK_ROUNDS=$${MLKIT_TEAM_SOAK_ROUNDS:-10} $(BIN)/python -m pytest -q tests/test_team.py -k "two_users"

lab: $(STAMP)  ## JupyterLab in the same environment, on 127.0.0.1 (root, as in containers and CI, needs --allow-root)
	$(BIN)/jupyter lab --ip 127.0.0.1 --port $(LAB_PORT) --notebook-dir . $$([ "$$(id -u)" = 0 ] && echo --allow-root)

team: $(STAMP)  ## a team stack on 127.0.0.1 until Ctrl-C: PostgreSQL, S3 (moto), MLflow with basic-auth; prints the export lines
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >/dev/null; } \
	  || { echo "make team needs PostgreSQL's server (apt-get install postgresql)"; exit 2; }
	$(BIN)/python scripts/team_stack.py $(TEAM_ARGS)

# Evidently, the monitoring benchmark's peer, from the `bench` extra into a venv of its own (it needs pandas < 3).
BENCH_VENV ?= .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.mlkit-bench-installed

$(BENCH_STAMP): pyproject.toml
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench']))" \
	  > $(BENCH_VENV)/requirements.txt
	$(BENCH_VENV)/bin/python -m pip install --quiet -r $(BENCH_VENV)/requirements.txt
	@touch $@

# LitServe, the serving benchmarks' other peer, in a venv of its own: torch first (pinned, CPU), then LitServe and mlkit
# itself (the peer services load the same bundle with mlkit's loader).
LITSERVE_VENV ?= .venv-litserve
LITSERVE_STAMP := $(LITSERVE_VENV)/.mlkit-litserve-installed

$(LITSERVE_STAMP): pyproject.toml
	@test -x $(LITSERVE_VENV)/bin/python || $(PYTHON) -m venv $(LITSERVE_VENV)
	$(LITSERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LITSERVE_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(LITSERVE_VENV)/bin/python -m pip install --quiet "litserve==0.2.19" -e .
	@touch $@

# AREA=serving (or images, data, monitoring, train_loop, pyfunc, papermill, gpu; several with spaces) runs those only;
# a report that then holds every area rewrites the README's table.
AREA ?=
bench: $(STAMP) $(BENCH_STAMP) $(LITSERVE_STAMP)  ## benchmarks with same-run baselines -> bench/reports/latest.{md,json}
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q wrk >/dev/null; } \
	  || { echo "make bench needs wrk (apt-get install wrk)"; exit 2; }
	DO_NOT_TRACK=1 MLKIT_BENCH_EVIDENTLY_PYTHON=$(abspath $(BENCH_VENV))/bin/python MLKIT_BENCH_LITSERVE_PYTHON=$(abspath $(LITSERVE_VENV))/bin/python \
	  $(BIN)/python bench/run.py $(AREA)

clean-state:  ## remove the embedded state folder (.mlkit/)
	rm -rf .mlkit
