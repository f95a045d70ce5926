# Two commands for a newcomer: `make run` serves a model, `make test` runs every test.
# Both set up what they need first (idempotent: a second run takes seconds).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

# `make run` passes the environment through, like the container would receive it.
# With no MODEL_NAME it serves SmolLM2-135M-Instruct, converted offline by `make models`, under
# the Hub id it was converted from, with its folder name as an alias. These defaults are the
# run target's only: the tests set what each stack needs.
ifeq ($(origin MODEL_NAME),undefined)
run: export MODEL_NAME := $(CURDIR)/.models/smollm2-135m-instruct
run: export SERVED_MODEL_NAME ?= HuggingFaceTB/SmolLM2-135M-Instruct,smollm2-135m-instruct
endif
run: export ENFORCE_EAGER ?= true

.PHONY: run test setup system models bench clean

setup:
	tools/setup_env.sh

system:
	tools/setup_system.sh

models: setup
	$(PY) tools/build_test_models.py

run: models
	PYTHON=$(PY) exec scripts/start.sh

test: system models
	$(PY) -m pytest tests

bench: models system
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf bench/results .pytest_cache
