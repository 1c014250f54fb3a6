"""Errors a user can read (issue 20.6): every entry point turns a bad value or a missing file into ONE line on
stderr naming the value and the fix, with a non-zero exit, before anything heavy loads (each run < a few s);
``HYDRA_FULL_ERROR=1`` still shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rsd import PROJECT_ROOT

EVALUATE = [sys.executable, str(PROJECT_ROOT / "evaluate.py")]
TRAIN = [sys.executable, str(PROJECT_ROOT / "train.py")]
PREPARE = [sys.executable, "-m", "rsd.prepare"]


def _run(cmd: list[str], tmp_path, full: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", RSD_ROOT=str(tmp_path))  # logs/data under tmp: nothing found
    env.pop("HYDRA_FULL_ERROR", None)
    if full:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args,needles", [
    (["ckpt=/tmp/missing.pt"], ["ckpt=/tmp/missing.pt", "ckpt=best"]),
    (["trials=-1"], ["trials=-1", "1..50"]),
    (["tasks=[99]"], ["tasks=[99]", "0..9"]),
    (["mode=sideways"], ["mode='sideways'", "speculative|baseline|both"]),
    (["policy.depth=0"], ["policy.depth=0", "1..8"]),
    (["ckpt=best", "policy.depth=0"], ["policy.depth=0"]),
    (["workers=-3"], ["workers=-3", ">= 0"]),
    (["workers=many"], ["workers='many'", "or auto"]),
    (["policy.epsilon=0"], ["policy.epsilon=0"]),
    (["policy.acceptance=loose"], ["policy.acceptance='loose'", "strict|relaxed|epsilon"]),
    (["policy=expert", "+policy.depth=4"], ["policy=expert does not honour policy.depth=4"]),
    (["policy=nope"], ["policy/nope", "engine"]),
    (["policy=vla_llm"], ["policy=vla_llm needs ckpt="]),
    (["sequential=true"], ["sequential=true", "mode=both"]),
    (["mode=both", "sequential=true", "sequential_alpha=1.5"], ["sequential_alpha=1.5", "(0, 1)"]),
])
def test_evaluate_bad_value_is_one_line(args, needles, tmp_path):
    proc = _run([*EVALUATE, *args, "wandb=false"], tmp_path)
    _one_line(proc, *needles)
    assert not (tmp_path / "logs").exists()  # stopped before Hydra made a run folder


def test_evaluate_missing_draft_under_ckpt_best_is_one_line(tmp_path):
    """``ckpt=best`` with no trained draft: the project's own error (found after the config checks) is one line."""
    proc = _run([*EVALUATE, "tasks=[0]", "trials=1", "workers=0", "wandb=false", "progress=false"], tmp_path)
    assert proc.returncode == 1
    _one_line(proc, "ckpt=best", "make train")


def test_full_error_shows_the_traceback(tmp_path):
    proc = _run([*EVALUATE, "policy.depth=0"], tmp_path, full=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "policy.depth=0" in proc.stderr


@pytest.mark.parametrize("args,needles", [
    (["experiment=nope"], ["experiment/nope", "draft_proj"]),
    (["logger=none"], ["no experiment chosen", "experiment=draft_proj"]),
    (["experiment=draft_proj", "trainer.max_epochs=0"], ["trainer.max_epochs=0"]),
    (["experiment=draft_proj", "prepare.until=bake"], ["prepare.until='bake'", "distill"]),
    (["experiment=draft_proj", "ckpt_path=/tmp/nope.ckpt"], ["ckpt_path=/tmp/nope.ckpt", "auto"]),
])
def test_train_bad_value_is_one_line(args, needles, tmp_path):
    _one_line(_run([*TRAIN, *args], tmp_path), *needles)


@pytest.mark.parametrize("args,needles", [
    (["experiment=nope"], ["experiment/nope"]),
    (["prepare.until=bake"], ["prepare.until='bake'"]),
    (["prepare.demos.per_task=0"], ["prepare.demos.per_task=0"]),
    (["prepare.demos.task_demos={8: 0}"], ["prepare.demos.task_demos", ">= 1"]),
    (["prepare.demos.task_demos=[8]"], ["prepare.demos.task_demos=[8]"]),
    (["--adopt"], ["--adopt needs a step"]),
])
def test_prepare_bad_value_is_one_line(args, needles, tmp_path):
    _one_line(_run([*PREPARE, *args], tmp_path), *needles)


def test_workers_auto_is_one_per_core_on_the_cpu_and_one_on_a_gpu():
    from rsd.evaluate import resolve_workers

    assert resolve_workers("auto", "cpu", cpu_count=2) == 2
    assert resolve_workers("auto", "cpu", cpu_count=64) == 8  # capped: each worker holds its own models
    assert resolve_workers("auto", "cuda:0", cpu_count=16) == 1  # one copy of the models on the GPU
    assert resolve_workers(3, "cuda", cpu_count=16) == 3 and resolve_workers(0, "cpu") == 0
