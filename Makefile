# Two commands matter:  make train  (the main job)   and   make test  (what CI runs)
PY := .venv/bin/python
export MUJOCO_GL ?= egl
export WANDB_SILENT ?= true

.PHONY: env train test lint collect rfsq evaluate clean-logs

env:  ## create or refresh .venv (idempotent, fast when up to date)
	@bash scripts/setup_env.sh

train: env  ## the main job: train the draft model (builds demos, tokenizer and cache on first run)
	$(PY) train.py experiment=draft_proj $(ARGS)

test: env  ## the whole test suite (< 15 min on 2 cores)
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

lint: env
	.venv/bin/ruff check .

collect: env  ## scripted-expert demonstrations for libero_spatial
	$(PY) -m rsd.data.collect suite=libero_spatial demos_per_task=50 $(ARGS)

rfsq: env  ## train the RFSQ action tokenizer
	$(PY) train.py experiment=rfsq $(ARGS)

evaluate: env  ## LIBERO rollouts of the best draft checkpoint with the speculative engine
	$(PY) evaluate.py ckpt=best $(ARGS)
