VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# AIMET, the quantization benchmark's second anchor, in an environment of its own: aimet-torch
# imports torchvision, whose wheel pairs with a CUDA build of torch (it runs on the CPU), not with
# this project's CPU torch. benchmarks/quantization.py runs it there (AIMET_PYTHON).
AIMET_VENV := .venv-aimet
AIMET_STAMP := $(AIMET_VENV)/.installed

.PHONY: demo reproduce bench test lint clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(AIMET_STAMP):
	python3 -m venv $(AIMET_VENV)
	$(AIMET_VENV)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 aimet-torch==2.42.0
	touch $(AIMET_STAMP)

demo: $(STAMP)
	$(VENV)/bin/gaugefix inspect resnet
	$(VENV)/bin/gaugefix reproduce --quick --jobs 2 --out gaugefix-results/quick

reproduce: $(STAMP)
	$(VENV)/bin/gaugefix reproduce --jobs 2 --out gaugefix-results/full

bench: $(STAMP) $(AIMET_STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	AIMET_PYTHON=$(AIMET_VENV)/bin/python $(PY) benchmarks/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

test: lint
	$(PY) -m pytest -q --durations=30

clean:
	rm -rf $(VENV) $(AIMET_VENV) build src/*.egg-info
