# villaged — every target creates and uses .venv by itself.
# `make check` is exactly what CI runs (through `make test` + lint + types).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV    ?= var/dev
PYTEST_ARGS ?=

.PHONY: all run test check lint types bench clean distclean

all: check

$(STAMP): setup.cfg pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: Python 3.11 is required (python3.11 or python3)"; exit 1; }
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "make: Python >= 3.11 is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Start a working single-node dev server on localhost (config, certificates, keys
# and demo accounts are generated once under $(DEV)/ and kept afterwards).
run: $(STAMP)
	$(BIN)/villaged init --dev --dir $(DEV) --demo-users
	exec $(BIN)/villaged run -c $(DEV)/villaged.toml

test: $(STAMP)
	bash .ci/system-deps
	bash tests/net/sslyze_env.sh
	$(BIN)/python -m pytest --cov --cov-report=term $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check villaged tests bench
	$(BIN)/ruff format --check villaged tests bench

types: $(STAMP)
	$(BIN)/mypy

check: lint types test

bench: $(STAMP)
	$(BIN)/python bench/storage_append.py
	$(BIN)/python bench/xml_parse.py
	$(BIN)/python bench/c2s_throughput.py --pairs 50 --seconds 10
	$(BIN)/python bench/c2s_throughput.py --pairs 50 --rate 500 --seconds 10 --idle 2000
	$(BIN)/python bench/c2s_throughput.py --pairs 50 --seconds 10 --ws
	$(BIN)/python bench/c2s_throughput.py --pairs 50 --rate 500 --seconds 10 --ws

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .coverage build *.egg-info

distclean: clean
	rm -rf $(VENV) var
