# Everything a fresh clone needs is built from here; targets that need the venv depend on it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Put the venv first on PATH: coglet starts its worker as a bare `python`.
export PATH := $(abspath $(VENV))/bin:$(PATH)

PROMPT ?= Tell me something about alpacas.
PORT ?= 5000
WEIGHTS ?=
DATA ?=
ARGS ?=

.PHONY: setup weights schema serve serve-train predict train demo demo-facts test test-all soak lint bench eval clean

setup: $(STAMP)

# Everything in requirements.txt, bitsandbytes included: its wheel carries a CPU backend, so
# quantization 8bit/4bit trains and serves on a CPU too.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

weights: $(STAMP)
	$(PY) -m finetune fetch-default

schema: $(STAMP)
	$(PY) -m finetune.cog.cogtools schema

serve: weights schema
	$(PY) -m finetune.cog.cogtools serve --mode predict --port $(PORT)

serve-train: weights schema
	$(PY) -m finetune.cog.cogtools serve --mode train --port $(PORT)

predict: weights schema
	$(PY) -m finetune.cog.cogtools predict --port $(PORT) $(if $(WEIGHTS),--weights "$(WEIGHTS)") -i prompt="$(PROMPT)" $(ARGS)

train: weights schema
	@test -n "$(DATA)" || { echo "usage: make train DATA=path/to/data.json [ARGS='-i num_train_epochs=2']"; exit 2; }
	$(PY) -m finetune.cog.cogtools train --port $(PORT) -i train_data=@"$(DATA)" $(ARGS)

demo: weights schema
	$(PY) -m finetune.cog.demo $(ARGS)

demo-facts: weights schema
	$(PY) -m finetune.cog.demo --facts $(ARGS)

test: weights
	$(PY) -m pytest -q

# 8 clients beside a ninth sending hostile requests for SOAK_SECONDS (300), production defaults.
soak: weights
	$(PY) -m pytest -q -m soak -s

# The default suite plus the slow tests (the whole-dataset learning check, fuzzing at scale).
test-all: weights
	$(PY) -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf .cog .pytest_cache outputs

eval: weights
	$(PY) -m finetune eval --data data/demo/persona_heldout.json $(if $(ADAPTER),--adapter "$(ADAPTER)") $(ARGS)

bench: weights
	$(PY) bench/run.py $(ARGS)
