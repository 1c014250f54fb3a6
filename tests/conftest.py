"""Test-wide settings (no W&B network, headless MuJoCo, quiet robosuite) and shared fixtures."""

import os
import tempfile

import pytest

# Every path of conf/paths under a throw-away root: a test that composes a real experiment (whose pipeline
# would build demos, a tokenizer and a cache under data/) never reads or writes the user's data/ and logs/.
os.environ["RSD_ROOT"] = tempfile.mkdtemp(prefix="rsd-tests-")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a shared, loaded 2-core machine.

    Use per module with ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
