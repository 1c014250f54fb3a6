"""Training entry point: build the run's missing inputs, then fit the experiment's LightningModule.

``python train.py experiment=draft_proj`` (the root script) calls :func:`main`. A run needs data that
earlier stages make; :func:`build_inputs` is the one visible step that makes whatever is missing, in
order, and prints what it builds and why before it starts:

1. scripted-expert demonstrations (``rsd.data.collect``; new scenes, held out from the official init states);
2. the RFSQ tokenizer (this same entry point with ``experiment=rfsq``);
3. the feature cache (``rsd.data.cache.build_cache``).

``data.build_if_missing=false`` turns the step off (a missing input is then an error naming the command).
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rsd import PROJECT_ROOT
from rsd.utils.config import CONFIG_DIR, find_latest_last_ckpt, instantiate_group

log = logging.getLogger("rsd.train")

FEATURE_CACHE_MODULE = "rsd.data.cache_datamodule.FeatureCacheDataModule"
ACTION_CHUNKS_MODULE = "rsd.data.action_chunks.ActionChunkDataModule"


# ----------------------------------------------------------------------------------------- inputs
@dataclass
class BuildStep:
    """One input to build: what, where, why, and the call that builds it."""

    what: str
    path: Path
    why: str
    run: Callable[[], Any]


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path


def _demos_step(suite: str, demos_dir: Path, per_task: int, tasks: list[int] | None = None,
                workers: int = 2) -> BuildStep | None:
    from rsd.data.action_chunks import demo_files
    from rsd.data.collect import collect_suite

    if demo_files(demos_dir, suite):
        return None
    return BuildStep(f"scripted-expert demonstrations ({per_task} per task, new initial scenes)", demos_dir / suite,
                     "no *_demo.hdf5 files there",
                     lambda: collect_suite(suite, per_task, tasks=tasks, workers=workers, out_dir=str(demos_dir)))


def plan_inputs(data_cfg: Mapping[str, Any]) -> list[BuildStep]:
    """The steps that would make ``data_cfg``'s inputs exist (empty when everything is there)."""
    from rsd.data.cache import (
        build_cache,
        cache_complete,
        check_identity,
        read_manifest,
        requested_backbone_id,
    )

    data_cfg = dict(_plain(data_cfg) or {})
    target = data_cfg.get("_target_")
    if target == ACTION_CHUNKS_MODULE:
        if not data_cfg.get("collect_missing", True):
            return []
        step = _demos_step(data_cfg.get("suite", "libero_spatial"), _resolve(data_cfg["demos_dir"]),
                           int(data_cfg.get("demos_per_task") or 50), data_cfg.get("collect_tasks"),
                           int(data_cfg.get("collect_workers", 2)))
        return [step] if step else []
    if target != FEATURE_CACHE_MODULE or not data_cfg.get("build_if_missing", True):
        return []
    b = dict(data_cfg.get("build") or {})
    suite = b.get("suite") or data_cfg.get("suite") or "libero_spatial"
    cache_dir = _resolve(b.get("cache_dir") or data_cfg["cache_dir"])
    if cache_dir != _resolve(data_cfg["cache_dir"]):
        raise ValueError(f"data.build.cache_dir {cache_dir} differs from data.cache_dir {data_cfg['cache_dir']}")
    backbone = b.get("backbone") or {"name": "sim_state"}
    if cache_complete(cache_dir):
        manifest = read_manifest(cache_dir)
        if backbone.get("name") and backbone["name"] != manifest["backbone"]["name"]:
            from rsd.data.cache import CacheMismatchError

            raise CacheMismatchError(f"feature cache {cache_dir} holds backbone {manifest['backbone']['name']}, "
                                     f"requested {backbone['name']}: use another data.cache_dir")
        check_identity(manifest, cache_dir, suite=suite, hidden_dim=backbone.get("hidden_dim"),
                       backbone_id=requested_backbone_id(backbone) if backbone.get("name") else None)
        return []
    demos_dir = _resolve(b.get("demos_dir") or "data/demos")
    tokenizer_path = _resolve(b.get("tokenizer_path") or data_cfg["tokenizer_path"])
    steps = []
    demos = _demos_step(suite, demos_dir, int(b.get("demos_per_task") or 50), b.get("tasks"),
                        int(b.get("workers", 2)))
    if demos:
        steps.append(demos)
    if not tokenizer_path.is_file():
        steps.append(BuildStep("RFSQ tokenizer (experiment=rfsq)", tokenizer_path, "no tokenizer file there",
                               lambda: train_tokenizer(suite, tokenizer_path, demos_dir, b.get("log_dir"),
                                                       b.get("tokenizer_overrides"))))
    steps.append(BuildStep(f"feature cache (backbone {backbone.get('name')})", cache_dir,
                           "no complete cache there (manifest.json + arrays)",
                           lambda: build_cache(suite, cache_dir, tokenizer_path, demos_dir, backbone,
                                               hidden_dtype=b.get("hidden_dtype", "float16"),
                                               max_demos_per_task=b.get("max_demos_per_task"),
                                               val_fraction=float(b.get("val_fraction", 0.1)),
                                               progress=b.get("progress", True))))
    return steps


def build_inputs(cfg: DictConfig | Mapping[str, Any]) -> list[BuildStep]:
    """Build the run's missing inputs in order, printing the plan first; returns the steps that ran."""
    steps = plan_inputs(cfg.get("data") or {})
    if not steps:
        return []
    print(f"\nThis run needs {len(steps)} input(s) that do not exist yet; building them first:", flush=True)
    for i, s in enumerate(steps, 1):
        print(f"  {i}. {s.what} -> {s.path} ({s.why})", flush=True)
    for i, s in enumerate(steps, 1):
        log.info("[%d/%d] building %s -> %s", i, len(steps), s.what, s.path)
        s.run()
    return steps


def train_tokenizer(suite: str, tokenizer_path: str | Path, demos_dir: str | Path,
                    log_dir: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    """Train the RFSQ tokenizer into ``tokenizer_path``: the same as ``python train.py experiment=rfsq``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    log_dir = Path(log_dir) if log_dir else PROJECT_ROOT / "logs"
    out = log_dir / "rfsq" / "runs" / _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    args = ["experiment=rfsq", f"data.suite={suite}", f"data.demos_dir={demos_dir}",
            f"callbacks.export_tokenizer.out_path={tokenizer_path}", f"paths.output_dir={out}",
            "logger=csv", *(overrides or [])]
    log.info("training the RFSQ tokenizer: train.py %s", " ".join(args))
    if GlobalHydra.instance().is_initialized():
        train(compose(config_name="train", overrides=args))
    else:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=args)
        train(cfg)
    if not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer training finished but {tokenizer_path} was not written; see {out}")
    return Path(tokenizer_path)


# ----------------------------------------------------------------------------------------- fit
def train(cfg: DictConfig) -> dict[str, float]:
    """Build missing inputs, fit the experiment's LightningModule on its DataModule (resuming from
    ``ckpt_path``), test if ``cfg.test``; returns the final metrics."""
    if cfg.get("data") is None or cfg.get("model") is None:
        raise SystemExit("No experiment chosen. Run e.g. `python train.py experiment=draft_proj` "
                         "(experiments: conf/experiment/).")
    build_inputs(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    model: L.LightningModule = instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    for lg in loggers:
        if hasattr(lg, "log_hyperparams"):
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "auto":
        ckpt_path = find_latest_last_ckpt(cfg.paths.log_dir, cfg.task_name)
        log.info("Resuming from %s", ckpt_path or "scratch (no last.ckpt found)")
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule, ckpt_path="best" if trainer.checkpoint_callback else None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    for lg in loggers:
        if hasattr(lg, "finalize"):
            lg.finalize("success")
    log.info("Output folder: %s", cfg.paths.output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # returned for Hydra sweepers (e.g. optuna) optimising the monitored metric
    return metrics.get(cfg.get("optimized_metric", "val/accuracy"))
