"""Test-wide settings: no W&B network, headless MuJoCo, quiet robosuite."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
