# alignkit: `make setup demo` on a fresh machine, then `make test`.
PYTHON ?= python3
VENV ?= .venv
ALIGNKIT = $(VENV)/bin/alignkit
RECIPE ?=
ARGS ?=
# Multi-process runs: ACCELERATE_CONFIG=accelerate_configs/ddp.yaml (fsdp.yaml, fsdp_qlora.yaml, zero3.yaml,
# cpu_2proc.yaml) launches the stage with `accelerate launch`; NUM_PROCESSES overrides the config's count.
ACCELERATE_CONFIG ?=
NUM_PROCESSES ?=
LAUNCH = $(if $(ACCELERATE_CONFIG),$(VENV)/bin/accelerate launch --config_file $(ACCELERATE_CONFIG) \
	$(if $(NUM_PROCESSES),--num_processes $(NUM_PROCESSES)) -m alignkit,$(ALIGNKIT))

STAGES = sft eval rm dpo kto orpo ppo grpo rloo rest rlaif

.PHONY: setup demo validate plan merge pipeline score test lint clean $(STAGES)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# make demo: the whole demo pipeline (SFT -> RM -> PPO and DPO -> evaluation), report in runs/demo/report.md
demo: setup
	$(LAUNCH) pipeline recipes/demo/pipeline.yaml $(ARGS)

validate: setup
	$(ALIGNKIT) validate $(or $(RECIPE),recipes/demo/sft.yaml) $(ARGS)

# make pipeline RECIPE=recipes/demo/pipeline.yaml: its steps in order; run it again to continue after a stop
pipeline: setup
	$(LAUNCH) pipeline $(or $(RECIPE),recipes/demo/pipeline.yaml) $(ARGS)

# make plan RECIPE=recipes/qwen2.5-0.5b/sft-qlora.yaml ARGS="--gpus 2 --gpu-memory 24GB": memory before running
plan: setup
	$(ALIGNKIT) plan $(or $(RECIPE),recipes/demo/sft.yaml) $(ARGS)

# make sft RECIPE=recipes/demo/sft.yaml ARGS="train.max_steps=100"; the same for every stage.
# Without RECIPE, `make <stage>` runs the demo recipe of that stage (recipes/demo/<stage>.yaml).
# make sft RECIPE=... ACCELERATE_CONFIG=accelerate_configs/fsdp.yaml NUM_PROCESSES=8: several processes.
$(STAGES): setup
	$(LAUNCH) $@ $(or $(RECIPE),recipes/demo/$@.yaml) $(ARGS)

# make merge RUN=runs/demo-sft-qlora: the adapter folded into its (dequantised) base, in runs/demo-sft-qlora-merged
merge: setup
	$(ALIGNKIT) merge $(or $(RUN),runs/demo-sft) $(ARGS)

# make score FILE=runs/demo-sft/predictions.jsonl
score: setup
	$(ALIGNKIT) score $(FILE) $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q --durations=30 tests

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf runs
