"""Evaluation entry point: ``python evaluate.py ckpt=best trials=50`` (see conf/eval.yaml).

Runs the suite's tasks under the OpenVLA / OpenVLA-OFT protocol with the speculative engine (or the
baseline, or both on the same init states), appends every episode to ``<out_dir>/episodes.jsonl`` (a rerun
with the same ``out_dir`` resumes), then writes and prints the summary and logs it to Weights & Biases.
The init states must be held out from the models' training data (``rsd.eval.runner.check_held_out``);
the summary names every artifact it loaded (path, sha256, artifact content hash), the code commit and the machine.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rsd.eval.runner import run_evaluation
from rsd.eval.shard import shard_dirname
from rsd.eval.summary import log_to_wandb, print_summary, summarize, write_summary
from rsd.policies.registry import resolve_policy_spec
from rsd.utils.artifacts import code_version, file_sha256, read_artifact
from rsd.utils.config import CONFIG_DIR

log = logging.getLogger("evaluate")

if not OmegaConf.has_resolver("rsd_first"):
    # ``${rsd_first:a,b}``: the first argument that is not null (out_dir, else a new run folder)
    OmegaConf.register_new_resolver("rsd_first", lambda *args: next((a for a in args if a is not None), None))


def _container(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def output_dir(cfg: DictConfig) -> Path:
    if cfg.get("out_dir"):
        if cfg.get("shard") is not None:  # shard i/n of out_dir X -> X/shard_<i>_of_<n> (rsd.eval.shard)
            return Path(cfg.out_dir) / shard_dirname(cfg.shard)
        return Path(cfg.out_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def machine_info() -> dict[str, Any]:
    """The machine a result comes from (CPU model, cores, GPU), recorded in every summary."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "host": platform.node(),
                            "python": platform.python_version()}
    try:
        import torch  # recorded only when the policy's stack has it

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def policy_artifacts(spec: dict) -> dict[str, Any]:
    """Every file the policy loads, with its sha256 and the content hash of the artifact folder holding it."""
    out = {}
    for key in ("ckpt", "main_ckpt", "tokenizer"):
        path = spec.get(key)
        if not path or not Path(str(path)).is_file():
            continue
        manifest = read_artifact(Path(path).parent)
        out[key] = {"path": str(path), "sha256": file_sha256(path),
                    "artifact": None if manifest is None else {"kind": manifest.get("kind"),
                                                               "content_hash": manifest.get("content_hash")}}
    return out


def evaluate(cfg: DictConfig) -> dict:
    """Run (or resume) the evaluation of ``cfg``; returns the summary dict."""
    out_dir = output_dir(cfg)
    spec = resolve_policy_spec(_container(cfg.policy))
    log.info("Evaluating %s (%s) -> %s", cfg.suite, spec.get("factory"), out_dir)
    run = run_evaluation(
        suite=cfg.suite, policy_spec=spec, out_dir=out_dir, tasks=_container(cfg.tasks),
        trials=_container(cfg.trials), mode=cfg.mode, workers=int(cfg.workers), max_steps=cfg.max_steps,
        video=_container(cfg.video), retry_errors=bool(cfg.retry_errors), max_episodes=cfg.max_episodes,
        progress=bool(cfg.progress), threads_per_worker=cfg.threads_per_worker,
        resume_check=bool(cfg.resume_check), shard=cfg.get("shard"),
        allow_train_states=bool(cfg.get("allow_train_states", False)),
    )
    log.info(run.heldout["line"])
    summary = summarize(run.records, suite=cfg.suite, extra={
        "out_dir": str(out_dir), "policy": spec, "complete": len(run.records) == run.total,
        "work_list_episodes": run.total, "new_episodes": run.new, "resumed_episodes": run.skipped,
        "max_steps": run.max_steps, "heldout": run.heldout, "artifacts": policy_artifacts(spec),
        "code": code_version(), "machine": machine_info(), **({"shard": str(cfg.shard)} if cfg.get("shard") is not None else {}),
    })
    write_summary(out_dir, summary)
    print_summary(summary)
    if not summary["complete"]:
        log.warning("%d of %d episodes done; rerun with out_dir=%s to finish", len(run.records), run.total,
                    out_dir)
    if cfg.wandb and run.records:
        log_to_wandb(summary, run.records, out_dir, config=_container(cfg), project=cfg.wandb_project,
                     group=cfg.suite, tags=_container(cfg.tags), mode=cfg.wandb_mode,
                     max_videos=int(cfg.wandb_max_videos))
    log.info("Results: %s", out_dir)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> float | None:
    # Ctrl-C must interrupt (and leave a resumable folder) even when started as a background job of a
    # non-interactive shell, which starts programs with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        summary = evaluate(cfg)
    except KeyboardInterrupt:
        log.warning("Interrupted. Finished episodes are in %s/episodes.jsonl; resume with "
                    "`python evaluate.py ... out_dir=%s`", output_dir(cfg), output_dir(cfg))
        sys.exit(130)
    first = next(iter(summary["modes"].values()), None)
    return first["success_rate"] if first else None
