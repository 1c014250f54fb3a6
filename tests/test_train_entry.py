"""The generic train.py entry point: experiment selection and resume resolution."""

import subprocess
import sys
import time
from pathlib import Path

from rsd import PROJECT_ROOT
from rsd.utils.config import find_latest_last_ckpt


def test_train_without_experiment_says_what_to_run():
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "train.py"), "logger=none"],
                         capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert out.returncode != 0
    assert "experiment=draft_proj" in out.stdout + out.stderr


def test_auto_resume_picks_newest_last_ckpt(tmp_path: Path):
    assert find_latest_last_ckpt(tmp_path, "draft_proj") is None
    paths = []
    for name in ["2026-01-01_00-00-00", "2026-01-02_00-00-00"]:
        ckpt = tmp_path / "draft_proj" / "runs" / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"x")
        paths.append(ckpt)
        time.sleep(0.01)
    assert find_latest_last_ckpt(tmp_path, "draft_proj") == paths[-1]
