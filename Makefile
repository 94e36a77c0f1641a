VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo reproduce bench test lint clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gaugefix inspect resnet
	$(VENV)/bin/gaugefix reproduce --quick --jobs 2 --out gaugefix-results/quick

reproduce: $(STAMP)
	$(VENV)/bin/gaugefix reproduce --jobs 2 --out gaugefix-results/full

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info
