# Two commands a newcomer needs: `make demo` and `make test`. Each builds its own venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install test demo table1 table2 clean

install: $(VENV)/.installed

# constraints.txt pins the tested stack. torch above all: a bare `torch` pulls a multi-GB CUDA build on these machines.
# lmms-eval goes in with --no-deps: its metadata drags in torchvision and an unpinned torch (../shared/reference/stack-notes.md).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3
	touch $@

test: install
	$(PY) -m pytest -q tests

# Every method at the budgets it can reach, on the tiny model and the local benchmark (CPU, minutes).
demo: install
	$(PY) scripts/run.py experiment=demo
	$(PY) scripts/make_table.py --model demo-llava-1.5 --out results/demo --name demo

# The paper's Table 1 on LLaVA-1.5-7B (GPU, hub access or local data; see README).
table1: install
	$(PY) scripts/run.py experiment=table1
	$(PY) scripts/make_table.py --model llava-1.5-7b --out results --name table1

# The paper's Table 2: FLOPs, latency and memory of random-weight LLaVA architectures, full and every method. GPU:
# LLaVA-1.5-7B and LLaVA-NeXT-7B at full width in bf16; CPU: LLaVA-1.5 at reduced width, same depths (minutes).
table2: install
	$(PY) -m visiondrop.latency

clean:
	rm -rf $(VENV)
