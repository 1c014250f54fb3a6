"""The generic train.py entry point: experiment selection and resume resolution."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rsd import PROJECT_ROOT
from rsd.utils.config import find_latest_last_ckpt


def test_train_without_experiment_says_what_to_run() -> None:
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "train.py"), "logger=none"],
                         capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert out.returncode != 0
    assert "experiment=draft_proj" in out.stdout + out.stderr


def test_auto_resume_picks_newest_last_ckpt(tmp_path: Path) -> None:
    assert find_latest_last_ckpt(tmp_path, "draft_proj") is None
    paths = {}
    # modification times set explicitly (no sleeping): the newest run has the alphabetically first name,
    # so neither name order nor creation order gives the right answer by accident
    for name, mtime in [("2026-01-03_00-00-00", 1_000_000), ("2026-01-01_00-00-00", 3_000_000),
                        ("2026-01-02_00-00-00", 2_000_000)]:
        ckpt = tmp_path / "draft_proj" / "runs" / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"x")
        os.utime(ckpt, (mtime, mtime))
        paths[name] = ckpt
    assert find_latest_last_ckpt(tmp_path, "draft_proj") == paths["2026-01-01_00-00-00"]
    assert find_latest_last_ckpt(tmp_path, "main_head") is None  # another task's runs are not looked at


# ------------------------------------------------------------------------------------------------ W&B
def test_wandb_mode_detection(monkeypatch, tmp_path: Path) -> None:
    from rsd.utils import wandb_setup

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    reached = []
    monkeypatch.setattr(wandb_setup, "_wandb_reachable", lambda timeout=2.0: reached.append(1) or True)
    assert wandb_setup.resolve_wandb_mode() == "offline"  # no key: offline, without trying the network
    assert not reached
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    assert wandb_setup.resolve_wandb_mode() == "online"  # a key (netrc) and the network
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_setup.resolve_wandb_mode() == "online"
    monkeypatch.setattr(wandb_setup, "_wandb_reachable", lambda timeout=2.0: False)
    assert wandb_setup.resolve_wandb_mode() == "offline"  # a key but no network
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_setup.resolve_wandb_mode() == "disabled"  # the environment wins
    assert wandb_setup.resolve_wandb_mode("offline") == "offline"  # the config value wins over both


def test_default_logger_wandb_csv_writes_offline_run_and_csv(tmp_path: Path, monkeypatch) -> None:
    """``train.py`` without ``logger=``: W&B (offline here: no key) and CSV, both with the run's metrics."""
    from factories import TOKENIZER_ID, D, make_tiny_cache
    from hydra import compose, initialize_config_dir

    import rsd.train as entry
    from rsd.utils.config import CONFIG_DIR

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cache = make_tiny_cache(tmp_path / "cache")
    out = tmp_path / "run"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=draft_proj_gt", f"data.cache_dir={cache}", f"data.tokenizer_identity={TOKENIZER_ID}",
            f"backbone.hidden_dim={D}", "data.batch_size=32", "prepare.until=null",
            f"paths.log_dir={tmp_path / 'logs'}", f"paths.output_dir={out}", "callbacks.progress_bar=null",
            "trainer.accelerator=cpu", "trainer.max_epochs=1", "model.net.hidden_dim=32",
            "model.net.feedforward_dim=64", "model.net.num_heads=2"])
    assert list(cfg.logger) == ["wandb", "csv"] and cfg.logger.wandb.mode is None
    metrics = entry.train(cfg)
    import os

    assert os.environ["WANDB_MODE"] == "offline"  # detected (no key); monkeypatch restores it afterwards
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    import pandas as pd

    rows = pd.read_csv(out / "csv" / "metrics.csv")
    assert float(rows["val/accuracy"].dropna().iloc[-1]) == pytest.approx(metrics["val/accuracy"])
