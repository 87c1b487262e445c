# barista: `make demo` runs the main job, `make test` the test suite; both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DURATION ?= 60s

.PHONY: demo test test-quick lint typecheck system-deps bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

demo: $(BIN)/.installed system-deps
	$(BIN)/barista demo --duration $(DURATION)

# Debian packages the integration tests run for real (InfluxDB 1.x, VictoriaMetrics,
# WireGuard); installed when missing and we are root, else those tests say what to install.
system-deps:
	@bash .ci/install-system-deps

test: $(BIN)/.installed system-deps
	$(BIN)/pytest -q

test-quick: $(BIN)/.installed
	$(BIN)/pytest -q -m "not slow"

# mypy settings (strict for everything we ship, relaxed for tests and bench) are in
# pyproject.toml [tool.mypy]; the whole tree is checked.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy protocol agent controller bench tests

bench: $(BIN)/.installed system-deps
	$(BIN)/python bench/broadcast.py
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
