# Two commands a newcomer needs: `make demo` and `make test`. Each builds its own venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install lock test test-latest demo table1 table1_full table_video table2 throughput scaling position_bias position_bias_demo controlled_study ablations controlled_study_demo ablations_demo clean

# The two packages pyproject.toml cannot pin: torch (a CPU or CUDA build of one version, chosen by the machine) and
# lmms-eval (installed with --no-deps: its metadata drags in torchvision and an unpinned torch, stack-notes.md).
TORCH_VERSION := 2.13.0
LMMS_EVAL_VERSION := 0.7.3
LOCK := requirements.lock

install: $(VENV)/.installed

# Installs exactly the locked set. torch first, with its own dependencies, so that a GPU machine gets the CUDA build
# of the locked version and the nvidia-* libraries it pins; then every locked distribution without resolving.
$(VENV)/.installed: pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip setuptools
	$(PY) -m pip install -q -c $(LOCK) torch
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m visiondrop.stack check $(LOCK)
	touch $@

# Regenerates the lock deliberately: a clean environment from pyproject.toml's ranges and the two pins above,
# frozen whole (every distribution, pip and setuptools included). Run the suite on it before committing it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip setuptools
	.venv-lock/bin/pip install -q torch==$(TORCH_VERSION)
	.venv-lock/bin/pip install -q '.[dev]'
	.venv-lock/bin/pip install -q --no-deps lmms-eval==$(LMMS_EVAL_VERSION)
	.venv-lock/bin/python -m visiondrop.stack freeze > $(LOCK)
	rm -rf .venv-lock build

test: install
	$(PY) -m pytest -q tests

# The canary (not CI): the newest release of every dependency, torch excepted (a newer torch is a multi-GB CUDA
# download on the project machines), in .venv-latest; runs the engine, parity and plugin tests there and prints
# the versions it used. A failure here is news about the next release, not about the locked stack.
LATEST := .venv-latest
CANARY_TESTS := tests/test_engine.py tests/test_contract.py tests/test_generate.py tests/test_selection.py \
	tests/test_scoring.py tests/test_parity.py tests/test_fastv.py tests/test_pyramiddrop.py \
	tests/test_sparsevlm.py tests/test_visionzip.py tests/test_dart.py tests/test_divprune.py tests/test_vispruner.py \
	tests/test_fastervlm.py tests/test_hiprune.py tests/test_tome.py \
	tests/test_next.py tests/test_qwen.py tests/test_video_llava.py tests/test_video_qa.py tests/test_lmms_plugin.py
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip setuptools packaging
	$(LATEST)/bin/pip install -q torch==$(TORCH_VERSION)
	$(LATEST)/bin/pip install -q --no-deps --no-build-isolation -e .
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager torch==$(TORCH_VERSION) $$($(LATEST)/bin/python -m visiondrop.stack names)
	$(LATEST)/bin/pip install -q --upgrade --no-deps lmms-eval
	@echo "== test-latest: the newest releases ==" && $(LATEST)/bin/python -m visiondrop.stack versions
	VISIONDROP_ALLOW_UNTESTED_STACK=1 $(LATEST)/bin/python -m pytest -q -p no:cacheprovider $(CANARY_TESTS)

# Every method at the budgets it can reach, on the tiny model and the local benchmark (CPU, minutes).
demo: install
	$(PY) scripts/run.py experiment=demo
	$(PY) scripts/make_table.py --model demo-llava-1.5 --out results/demo --name demo

# The paper's Table 1 on LLaVA-1.5-7B (GPU, hub access or local data; see README).
table1: install
	$(PY) scripts/run.py experiment=table1
	$(PY) scripts/make_table.py --model llava-1.5-7b --out results --name table1

# Table 1 on the paper's whole image benchmark set (configs/benchmarks/paper_image.yaml: the five plus MMBench-CN,
# MME, TextVQA, VizWiz-VQA; GPU).
# The paper's video result on Video-LLaVA-7B (GPU, local data and a judge: configs/experiment/video.yaml).
table_video: install
	$(PY) scripts/run.py experiment=video
	$(PY) scripts/make_table.py --model video-llava-7b --out results --name table_video

table1_full: install
	$(PY) scripts/run.py experiment=table1 benchmarks=paper_image
	$(PY) scripts/make_table.py --model llava-1.5-7b --out results --name table1_full

# The paper's controlled study (PyramidDrop scored by text or by visual attention, 192/128/64 tokens) and VisionDrop's
# ablations (64 tokens) on LLaVA-1.5-7B, GQA and MMBench (GPU); results/<name>.{md,csv}.
controlled_study: install
	$(PY) scripts/run.py experiment=controlled_study
	$(PY) scripts/make_table.py --experiment controlled_study --model llava-1.5-7b --out results

ablations: install
	$(PY) scripts/run.py experiment=ablations
	$(PY) scripts/make_table.py --experiment ablations --model llava-1.5-7b --out results

# The same on the demo model and task (CPU, minutes), at budgets its 4 decoder layers reach (PyramidDrop and the
# decoder-only ablation: above 144); results/demo/<name>.{md,csv}.
controlled_study_demo: install
	$(PY) scripts/run.py experiment=controlled_study model=demo-llava-1.5 benchmarks=demo batch_size=4 budget=192,176,160
	$(PY) scripts/make_table.py --experiment controlled_study --model demo-llava-1.5 --out results/demo

ablations_demo: install
	$(PY) scripts/run.py experiment=ablations model=demo-llava-1.5 benchmarks=demo batch_size=4 budget=160
	$(PY) scripts/make_table.py --experiment ablations --model demo-llava-1.5 --out results/demo

# The paper's Table 2: FLOPs, latency and memory of random-weight LLaVA architectures, full and every method, at
# batch sizes 1, 8, 32 (GPU: LLaVA-1.5-7B and LLaVA-NeXT-7B at full width in bf16) or 1 and 8 (CPU: LLaVA-1.5 at
# reduced width, same depths; tens of minutes).
table2: install
	$(PY) -m visiondrop.efficiency.latency

# Throughput by batch size, full and VisionDrop side by side (the committed results/latency/ tables). On a CPU
# shared with other work: make throughput LATENCY_ARGS="--clock process" (how the committed CPU tables were taken).
LATENCY_ARGS ?=
throughput: install
	$(PY) -m visiondrop.efficiency.latency --methods none visiondrop --warmup 1 --out results/latency $(LATENCY_ARGS)

# Prefill time and peak memory of full and VisionDrop (retention 1/9) as the visual tokens grow: table and PNG.
scaling: install
	$(PY) -m visiondrop.efficiency.latency --scaling --out results/latency $(LATENCY_ARGS)

# Where each method's kept tokens come from: positional-bias maps of every method at 64 on POPE (LLaVA-1.5-7B, GPU),
# drawn as heatmaps (methods x cuts) with the vertical-bias table beside the paper's claim.
position_bias: install
	$(PY) scripts/run.py experiment=position_bias
	$(PY) scripts/position_bias.py --model llava-1.5-7b --benchmark POPE --out results --name position_bias

# The same on the demo model and benchmark (CPU, about a minute): 192 tokens, the budget every method reaches on its
# 4-layer decoder.
position_bias_demo: install
	$(PY) scripts/run.py experiment=position_bias model=demo-llava-1.5 benchmarks=demo budget=192
	$(PY) scripts/position_bias.py --model demo-llava-1.5 --benchmark Demo --out results/demo --name position_bias

clean:
	rm -rf $(VENV) $(LATEST)
