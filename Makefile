# fedllm — the operator's entry points. `make help` lists them.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel lies in this machine's local wheel folder; on GPU hosts the same pin pulls the CUDA build.
TORCH ?= torch==2.13.0
CONFIG ?= site_configs/default.yaml
WORKSPACE ?= workspace
JOB ?=

.PHONY: help install demo test lint format validate provision up down status submit clean

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(BIN)/fedllm: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,hf]"
	touch $@

install: $(BIN)/fedllm  ## create .venv with fedllm, nvflare and torch

demo: install  ## 3 local sites, a FedAvg job that really trains, metrics, shut down (CPU is fine)
	$(BIN)/fedllm demo

test: install  ## the test suite (the README's test command)
	$(BIN)/pytest -q

lint: install  ## ruff lint + format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

validate: install  ## check CONFIG (default site_configs/default.yaml)
	$(BIN)/fedllm validate -c $(CONFIG)

provision: install  ## startup kits with mTLS certificates under WORKSPACE/<project>/prod_NN
	$(BIN)/fedllm provision -c $(CONFIG) -w $(WORKSPACE)

up: install  ## start server and sites as local processes (containers: docker compose up)
	$(BIN)/fedllm up --native -c $(CONFIG) -w $(WORKSPACE)

down: install  ## stop the native federation
	$(BIN)/fedllm down -c $(CONFIG) -w $(WORKSPACE)

status: install
	$(BIN)/fedllm status -c $(CONFIG) -w $(WORKSPACE)

submit: install  ## submit JOB=<job folder>, wait, download into runs/results
	@test -n "$(JOB)" || { echo "usage: make submit JOB=runs/jobs/<job>"; exit 2; }
	$(BIN)/fedllm job submit $(JOB) -c $(CONFIG) -w $(WORKSPACE) --download runs/results

clean:  ## remove kits, runs and demo outputs (keeps .venv)
	rm -rf $(WORKSPACE) runs

## nemo
.PHONY: nemo-gpu-proof
# The Python that has NeMo (the NeMo image's); .venv has none.
NEMO_PY ?= python3
nemo-gpu-proof:  ## GPU + NeMo only: one p-tuning round of a random-weight 345M through a real server and site
	$(NEMO_PY) -m fedllm.nemo.gpu_proof --workspace $(WORKSPACE)/nemo-gpu-proof --sites 1 --rounds 1
