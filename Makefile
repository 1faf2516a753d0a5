# The two commands of the README. Both create .venv when it is missing and install medssl into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install bench clean assets evidence

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the packaging changes.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,tracking]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check medssl tests bench
	$(BIN)/ruff format --check medssl tests bench

test: lint
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m medssl.demo

# the SSL checkpoint that `make demo` fine-tunes (assets/ssl_vit_ct_cpu.pt + .json); committed, rebuilt by this
assets: $(STAMP)
	$(BIN)/python -m medssl.assets --out assets

# the full label-efficiency evidence on phantoms (resumable: rerun to continue); writes docs/evidence/
evidence: $(STAMP)
	$(BIN)/python -m medssl.evidence

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) runs demo data
