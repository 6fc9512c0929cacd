# villaged — every target creates and uses .venv by itself.
# `make check` is exactly what CI runs (through `make test` + lint + types).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV    ?= var/dev
PYTEST_ARGS ?=

.PHONY: all run cluster test check lint types bench clean distclean

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

# Start a three-node dev cluster on localhost (zones a, b, c; CA, certificates, shared keyset
# and demo passwords are generated once under .cluster/ and kept afterwards; rm -rf .cluster
# starts over). Ctrl-C stops every node.
cluster: $(STAMP)
	test -d .cluster || $(BIN)/villaged init --dev --cluster --dir .cluster --demo-users
	exec $(BIN)/villaged cluster run-local --dir .cluster

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
	$(BIN)/python bench/s2s_throughput.py --pairs 20 --seconds 10
	$(BIN)/python bench/cluster_throughput.py --clients 20,50 --seconds 10
	$(BIN)/python bench/cluster_throughput.py --clients 50 --rate 2500 --seconds 10

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .coverage build *.egg-info

distclean: clean
	rm -rf $(VENV) var

# Install on a server (README.md, "Install on a server"): a self-contained virtualenv in
# $(PREFIX)/lib/villaged with a villaged symlink in $(PREFIX)/bin, the systemd units (their
# /usr/local/bin/villaged rewritten to $(PREFIX)/bin/villaged), sysusers.d and tmpfiles.d entries,
# and the commented config unless one is already there. DESTDIR stages it elsewhere (the venv's
# scripts are rewritten to their final paths). pip needs the network, or PIP_INSTALL_ARGS such as
# "--no-index --find-links DIR".
PREFIX  ?= /usr/local
DESTDIR ?=
APPDIR  := $(PREFIX)/lib/villaged
UNITDIR := /lib/systemd/system
PIP_INSTALL_ARGS ?=
UNITS   := villaged.service villaged-backup.service villaged-backup.timer villaged-alert@.service

.PHONY: install
install:
	@test -n "$(PYTHON)" || { echo "make: Python 3.11 is required (python3.11 or python3)"; exit 1; }
	@case '$(PREFIX)' in /?*) ;; *) echo "make: PREFIX must be an absolute path"; exit 1;; esac
	$(PYTHON) -m venv --clear '$(DESTDIR)$(APPDIR)'
	'$(DESTDIR)$(APPDIR)/bin/python' -m pip install --quiet --disable-pip-version-check \
		--no-compile $(PIP_INSTALL_ARGS) .
	if [ -n '$(DESTDIR)' ]; then \
		grep -rlIZ -F '$(DESTDIR)$(APPDIR)' '$(DESTDIR)$(APPDIR)/bin' '$(DESTDIR)$(APPDIR)/pyvenv.cfg' \
			| xargs -0 -r sed -i 's|$(DESTDIR)$(APPDIR)|$(APPDIR)|g'; \
	fi
	'$(DESTDIR)$(APPDIR)/bin/python' -m compileall -q -d '$(APPDIR)/lib' '$(DESTDIR)$(APPDIR)/lib'
	install -d -m 0755 '$(DESTDIR)$(PREFIX)/bin' '$(DESTDIR)$(UNITDIR)' \
		'$(DESTDIR)/usr/lib/sysusers.d' '$(DESTDIR)/usr/lib/tmpfiles.d'
	ln -sfn '$(APPDIR)/bin/villaged' '$(DESTDIR)$(PREFIX)/bin/villaged'
	for unit in $(UNITS); do \
		sed 's|/usr/local/bin/villaged|$(PREFIX)/bin/villaged|g' "systemd/$$unit" \
			> '$(DESTDIR)$(UNITDIR)/'"$$unit" && chmod 0644 '$(DESTDIR)$(UNITDIR)/'"$$unit" || exit 1; \
	done
	install -m 0644 systemd/villaged.sysusers '$(DESTDIR)/usr/lib/sysusers.d/villaged.conf'
	install -m 0644 systemd/villaged.tmpfiles '$(DESTDIR)/usr/lib/tmpfiles.d/villaged.conf'
	install -d -m 0750 '$(DESTDIR)/etc/villaged'
	test -e '$(DESTDIR)/etc/villaged/villaged.toml' || \
		install -m 0640 conf/villaged.toml '$(DESTDIR)/etc/villaged/villaged.toml'
	@echo "installed; on the server now run: systemd-sysusers villaged.conf &&" \
		"systemd-tmpfiles --create villaged.conf && systemctl daemon-reload"
