# The two commands of README.md. Everything installs into ./.venv.
PY ?= python3
VENV := .venv
EXAMPLE := examples/inbound-support-mailbox

.PHONY: setup serve test lint bench

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Serve the example support mailbox: LMTP on :2424, state in $(EXAMPLE)/var.
serve: setup
	cd $(EXAMPLE) && ../../$(VENV)/bin/txco serve --personalities=lmtp

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest

# Figures, not pass/fail: see bench/README.md. bench/lmtp (Postfix's smtp-source against
# txco, Dovecot and aiosmtpd) takes several minutes and is run on its own.
bench: setup
	$(VENV)/bin/python bench/txcl_bench.py
	$(VENV)/bin/python bench/reload_bench.py
