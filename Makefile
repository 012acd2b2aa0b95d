# alignkit: `make setup sft` on a fresh machine, then `make test`.
PYTHON ?= python3
VENV ?= .venv
ALIGNKIT = $(VENV)/bin/alignkit
RECIPE ?= recipes/demo/sft.yaml
ARGS ?=

.PHONY: setup demo validate sft test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(ALIGNKIT) demo

validate: setup
	$(ALIGNKIT) validate $(RECIPE) $(ARGS)

sft: setup
	$(ALIGNKIT) sft $(RECIPE) $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf runs
