# fedhubert: two commands on a fresh machine.
#   make demo   set up (once) and run the pipeline on the built-in synthetic corpora
#   make test   set up (once), lint (ruff check, ruff format --check) and run the test suite
#   make test-quick   the same set-up and lint, then the unit tests and one end-to-end smoke pass
# Other targets: setup, bench, lock, clean. Variables: PYTHON (a Python 3.11), VENV, DEMO_DIR, PYTEST_ARGS,
# PYTEST_WORKERS (pytest-xdist workers, default 2; 0 runs in one process), SKIP_SYSTEM_DEPS=1 (do not check or install
# system packages; see setup.md for HPC clusters), WITH_SLURM=1 (make test also installs slurm-wlm and munge, so the
# Slurm tests run instead of being skipped; CI sets it).

SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedhubert-installed
DEMO_DIR ?= data/demo
PYTEST_ARGS ?=
# pytest-xdist workers: in one process the suite left the cores idle a third of its time (63% busy), so two workers
# share the two cores; files stay whole on one worker (--dist loadfile: module fixtures, the one Slurm cluster).
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: setup system-deps demo test test-quick bench lock clean

setup: $(STAMP)

system-deps:
	@if [ "$(SKIP_SYSTEM_DEPS)" = "1" ]; then echo "skipping system packages (SKIP_SYSTEM_DEPS=1)"; \
	else bash scripts/install_system_deps.sh; fi

$(STAMP): pyproject.toml requirements/lock.txt scripts/install_system_deps.sh
	@$(MAKE) --no-print-directory system-deps
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found. fedhubert needs Python 3.11:" \
	  "install it (apt-get install python3.11, pyenv install 3.11, uv python install 3.11, or 'module load python/3.11'" \
	  "on a cluster) and pass PYTHON=/path/to/python3.11"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "error: $(PYTHON) is" \
	  "Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'); fedhubert needs 3.11" \
	  "(pass PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	@# pip < 24.1: catalyst 22.4 (needed by S3PRL's speech_commands) has metadata that newer pip rejects.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "pip==24.0"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)
	@echo "fedhubert is installed in $(VENV); activate it with: source $(BIN)/activate"

demo: setup
	DEMO_DIR=$(DEMO_DIR) FEDHUBERT=$(BIN)/fedhubert bash scripts/demo.sh

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@if [ "$(WITH_SLURM)" = "1" ] && [ "$(SKIP_SYSTEM_DEPS)" != "1" ]; then WITH_SLURM=1 bash scripts/install_system_deps.sh; fi
	$(PYTEST) $(PYTEST_ARGS)

# The inner loop: lint, the unit tests and one end-to-end smoke pass (README: Tests).
test-quick: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST) -m "smoke or not (slow or stages)" $(PYTEST_ARGS)

# Speed and memory benchmarks: each writes benchmarks/results/<name>.json and prints a table.
bench: setup
	@for script in benchmarks/[a-z]*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

# Re-resolve requirements/requirements.in into requirements/lock.txt in a throw-away environment.
lock:
	rm -rf build/lock-venv && $(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install --quiet "pip==24.0"
	build/lock-venv/bin/python -m pip install --quiet -r requirements/requirements.in
	{ echo "# Pinned environment for fedhubert (Python 3.11). Installed by 'make setup' and CI."; \
	  echo "# Regenerate with 'make lock' after changing requirements/requirements.in."; \
	  build/lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^pip=='; } > requirements/lock.txt
	rm -rf build/lock-venv

clean:
	rm -rf build .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
