"""Draft checkpoints in the original project's format: export, load, resolve, inspect.

File ``best_draft_with_projection.pt`` (``torch.save`` of a dict):

- ``model_state_dict``: ``RFSQDraftModelWithProjection`` parameters (``input_projection.*``, ``decoder.*``,
  ``classification_heads.*``), the names and shapes of the original project;
- ``optimizer_state_dict``: AdamW state (one parameter group, ``model.parameters()`` order);
- ``epoch`` (int) and ``val_accuracy`` (float, mean coarse-layer token accuracy on held-out episodes);
- ``config``: ``{"model": draft constructor arguments, "run": the full Hydra run config or None}``;
- ``cache_manifest``: identity of the training data (backbone id and config, hidden dim, tokenizer
  identity, suite, cache path).

The original project's files have only the first four keys; ``load_draft_checkpoint`` reads both and
infers the hyperparameters from the state-dict shapes when there is no config. Any problem (missing
file, unreadable/truncated file, wrong keys or shapes) raises ``DraftCheckpointError`` with one message.

``ckpt=best`` is resolved by the evaluation (``rsd.policies.lineage.find_best_draft``); here a checkpoint is a path.

CLI: ``python -m rsd.models.checkpoint inspect <path>`` prints what the original guide checks (keys,
``val_accuracy``, epoch, and whether ``input_projection.weight`` is there, with its shape).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from rsd import PROJECT_ROOT
from rsd.models.draft import RFSQDraftModelWithProjection
from rsd.utils.export import BestCheckpointExport
from rsd.utils.serialization import UntrustedFileError, load_torch_file

log = logging.getLogger(__name__)

FILENAME = "best_draft_with_projection.pt"
ORIGINAL_KEYS = ("model_state_dict", "optimizer_state_dict", "epoch", "val_accuracy")
DEFAULTS = {"input_dim": 4096, "hidden_dim": 512, "num_coarse_layers": 3, "chunk_len": 8,
            "action_hidden_dim": 16, "grid_size": 7, "num_heads": 8, "feedforward_dim": 2048, "dropout": 0.1}


class DraftCheckpointError(RuntimeError):
    """A draft checkpoint is missing, unreadable or does not match the draft architecture."""


# ---------------------------------------------------------------------------------------------- export
def _plain(obj: Any) -> Any:
    """JSON-like plain python (so the file loads with ``weights_only=True``)."""
    return json.loads(json.dumps(obj, default=str))


def save_draft_checkpoint(path: str | os.PathLike, model_state_dict: Mapping[str, torch.Tensor],
                          optimizer_state_dict: Mapping[str, Any] | None, epoch: int, val_accuracy: float,
                          model_config: Mapping[str, Any], run_config: Any = None,
                          cache_manifest: Mapping[str, Any] | None = None, **extra: Any) -> Path:
    """Write a draft checkpoint (atomically) in the original format plus ``config``/``cache_manifest``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model_state_dict": {k: v.detach().cpu().clone() for k, v in model_state_dict.items()},
        "optimizer_state_dict": optimizer_state_dict if optimizer_state_dict is not None else {},
        "epoch": int(epoch),
        "val_accuracy": float(val_accuracy),
        "config": {"model": _plain(dict(model_config)), "run": _plain(run_config) if run_config else None},
        "cache_manifest": _plain(dict(cache_manifest)) if cache_manifest else None,
        "format": "rsd.draft_checkpoint",
        **{k: _plain(v) for k, v in extra.items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _optimizer_state_to_cpu(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _optimizer_state_to_cpu(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_optimizer_state_to_cpu(v) for v in state)
    return state


def _read_run_config(output_dir: Path) -> Any:
    cfg_file = output_dir / ".hydra" / "config.yaml"
    if not cfg_file.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=False)
    except Exception as err:  # noqa: BLE001 - the config is informational
        log.warning("could not read %s: %s", cfg_file, err)
        return None


class ExportDraftCheckpoint(BestCheckpointExport):
    """At the end of fit, write ``{output_dir}/best_draft_with_projection.pt`` from the best checkpoint.

    The best checkpoint is ``trainer.checkpoint_callback.best_model_path`` (monitoring ``val/accuracy``);
    without one (e.g. ``fast_dev_run``) the current weights and optimizer state are exported with the last
    logged ``val/accuracy``. The full run config is read from ``{output_dir}/.hydra/config.yaml``.
    """

    def __init__(self, output_dir: str, filename: str = FILENAME, monitor: str = "val/accuracy") -> None:
        super().__init__()
        self.output_dir = Path(output_dir)
        self.filename = filename
        self.monitor = monitor
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        best, score, ckpt = self.read_best_checkpoint(trainer)
        dm = trainer.datamodule
        cache = dm.cache_identity() if dm is not None and hasattr(dm, "cache_identity") else None
        if ckpt is not None:
            state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
            opt_states = ckpt.get("optimizer_states") or [{}]
            optimizer_state = opt_states[0]
            epoch = int(ckpt.get("epoch", 0))
            val_acc = score if score is not None else float("nan")
            cache = ckpt.get("cache_manifest") or cache
            source = best
        else:
            state = pl_module.model.state_dict()
            optimizer_state = trainer.optimizers[0].state_dict() if trainer.optimizers else {}
            epoch = int(trainer.current_epoch)
            metric = trainer.callback_metrics.get(self.monitor)
            val_acc = float(metric) if metric is not None else float("nan")
            source = "final weights (no best checkpoint)"
        run_cfg = _read_run_config(self.output_dir)
        self.path = save_draft_checkpoint(
            self.output_dir / self.filename, state, _optimizer_state_to_cpu(optimizer_state), epoch, val_acc,
            pl_module.model_config(), run_cfg, cache, source=str(source))
        log.info("exported draft checkpoint %s (val_accuracy %.4f, epoch %d, from %s)", self.path, val_acc, epoch,
                 source)


# ---------------------------------------------------------------------------------------------- load
def _load_payload(path: Path, map_location: str | torch.device, trust: bool = False) -> Any:
    """The file's dict, loaded without running code from it unless ``trust`` (see ``rsd.utils.serialization``);
    an original-project file holding Python objects (e.g. an argparse Namespace) needs ``trust``."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DraftCheckpointError(f"draft checkpoint {path} cannot be read: {err}") from err
    try:
        return load_torch_file(data, map_location, trust=trust, what="draft checkpoint",
                               opt_in="policy.trust_checkpoints=true (evaluate.py) or --trust (the CLI)")
    except UntrustedFileError as err:
        raise DraftCheckpointError(str(err)) from err
    except Exception as err:  # noqa: BLE001 - zip/EOF/pickle/runtime errors all mean an unreadable file
        raise DraftCheckpointError(_corrupt_msg(path, err)) from err


def _corrupt_msg(path: Path, err: Exception) -> str:
    first = str(err).splitlines()[0] if str(err) else ""
    return (f"draft checkpoint {path} is truncated or corrupt: torch.load failed ({type(err).__name__}: "
            f"{first}). Re-export it (train.py experiment=draft_proj writes {FILENAME}) or copy it again.")


def infer_model_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Draft hyperparameters from state-dict shapes (original files carry no config).

    ``num_heads`` cannot be read from shapes (8, the original value, is assumed); ``grid_size`` 7 and
    ``chunk_len`` 8 are assumed to split the heads' ``128 * 7`` outputs.
    """
    try:
        w = state["input_projection.weight"]
        heads = sorted({int(k.split(".")[1]) for k in state if k.startswith("classification_heads.")})
        out = state[f"classification_heads.{heads[0]}.3.weight"].shape[0]
        ff = state["decoder.decoder_layer.linear1.weight"].shape[0]
    except (KeyError, IndexError, AttributeError) as err:
        raise DraftCheckpointError(f"state dict lacks draft parameters ({err}); keys: "
                                   f"{sorted(state)[:8]}...") from err
    cfg = dict(DEFAULTS)
    grid, chunk = DEFAULTS["grid_size"], DEFAULTS["chunk_len"]
    if out % (grid * chunk):
        raise DraftCheckpointError(f"classification head output {out} is not 8 x latent x 7")
    cfg.update(input_dim=int(w.shape[1]), hidden_dim=int(w.shape[0]), num_coarse_layers=len(heads),
               action_hidden_dim=out // (grid * chunk), feedforward_dim=int(ff))
    return cfg


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    for prefix in ("module.", "model.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_draft_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                          require_keys: tuple[str, ...] = ORIGINAL_KEYS, trust: bool = False
                          ) -> tuple[RFSQDraftModelWithProjection, dict[str, Any]]:
    """Load a draft checkpoint (this project's or the original's) -> ``(model in eval mode, info)``.

    ``info``: ``path``, ``format`` (``rsd`` / ``original``), ``keys``, ``epoch``, ``val_accuracy``,
    ``model_config``, ``config_source`` (``file`` / ``inferred``), ``run_config``, ``cache_manifest``,
    ``optimizer_state_dict``, ``num_parameters``. Raises ``DraftCheckpointError`` on any problem, and for a
    file that needs full unpickling unless ``trust`` (which runs code stored in the file).
    """
    path = Path(path)
    if not path.is_file():
        raise DraftCheckpointError(f"draft checkpoint not found: {path}. Train one with `python train.py "
                                   f"experiment=draft_proj` (writes logs/draft_proj/runs/<time>/{FILENAME}) or "
                                   "pass an existing file (ckpt=<path>).")
    payload = _load_payload(path, map_location, trust)
    if not isinstance(payload, Mapping):
        raise DraftCheckpointError(f"draft checkpoint {path} holds a {type(payload).__name__}, expected a dict "
                                   f"with keys {list(ORIGINAL_KEYS)}")
    missing = [k for k in require_keys if k not in payload]
    if missing:
        raise DraftCheckpointError(f"draft checkpoint {path} does not match the draft format: missing keys "
                                   f"{missing} (has {sorted(payload)[:10]}); expected {list(ORIGINAL_KEYS)}")
    state = payload["model_state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DraftCheckpointError(f"draft checkpoint {path}: model_state_dict is not a state dict of tensors")
    state = _strip_prefix(state)
    config = payload.get("config") if isinstance(payload.get("config"), Mapping) else None
    model_cfg = dict(config.get("model") or {}) if config else {}
    source = "file" if model_cfg else "inferred"
    if not model_cfg:
        model_cfg = infer_model_config(state)
    model_cfg = {**DEFAULTS, **{k: v for k, v in model_cfg.items() if k in DEFAULTS}}
    try:
        model = RFSQDraftModelWithProjection(**model_cfg)
    except Exception as err:  # noqa: BLE001
        raise DraftCheckpointError(f"draft checkpoint {path}: bad model config {model_cfg} ({err})") from err
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    absent = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if wrong or absent or extra:
        detail = "; ".join(wrong[:3] + ([f"missing {absent[:3]}{'...' if len(absent) > 3 else ''}"] if absent else [])
                           + ([f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"] if extra else []))
        raise DraftCheckpointError(f"draft checkpoint {path} does not match RFSQDraftModelWithProjection"
                                   f"({model_cfg}): {detail}")
    model.load_state_dict(state)
    model.to(map_location).eval()
    val_acc = payload.get("val_accuracy")
    info = {
        "path": str(path),
        "format": "rsd" if payload.get("format") == "rsd.draft_checkpoint" or "cache_manifest" in payload
        else "original",
        "keys": list(payload.keys()),
        "epoch": payload.get("epoch"),
        "val_accuracy": float(val_acc) if isinstance(val_acc, int | float | torch.Tensor) else val_acc,
        "model_config": model_cfg,
        "config_source": source,
        "run_config": config.get("run") if config else None,
        "cache_manifest": payload.get("cache_manifest"),
        "optimizer_state_dict": payload.get("optimizer_state_dict"),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "input_projection": tuple(state["input_projection.weight"].shape),
    }
    return model, info


# ---------------------------------------------------------------------------------------------- resolve
def resolve_draft_checkpoint(spec: str | os.PathLike) -> Path:
    """A draft checkpoint path (relative paths are tried from the working directory, then from the project
    root). ``best`` is not a path: it is resolved by the evaluation (``rsd.policies.lineage.find_best_draft``,
    the one rule for it). Raises ``DraftCheckpointError``."""
    if str(spec) == "best":
        raise DraftCheckpointError("'best' names no file here: `python evaluate.py ckpt=best` resolves it "
                                   "(rsd.policies.lineage.find_best_draft); pass a path to a draft checkpoint")
    path = Path(spec).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    if not path.is_file():
        raise DraftCheckpointError(f"draft checkpoint not found: {spec} (use ckpt=best or ckpt=<path to "
                                   f"{FILENAME}>)")
    return path


# ---------------------------------------------------------------------------------------------- CLI
def inspect_checkpoint(spec: str, trust: bool = False) -> dict[str, Any]:
    """What the original guide checks, as a dict (also printed by the CLI).

    Missing and unreadable files raise ``DraftCheckpointError``; a readable file that does not load into
    the draft model is reported with ``loads: False`` and the reason in ``error``.
    """
    path = resolve_draft_checkpoint(spec)
    payload = _load_payload(path, "cpu", trust)
    keys = list(payload.keys()) if isinstance(payload, Mapping) else []
    state = payload.get("model_state_dict") if isinstance(payload, Mapping) else None
    proj = state.get("input_projection.weight") if isinstance(state, Mapping) else None
    if proj is None and isinstance(state, Mapping):
        proj = _strip_prefix(state).get("input_projection.weight")
    out: dict[str, Any] = {
        "path": str(path), "keys": keys,
        "val_accuracy": payload.get("val_accuracy") if keys else None,
        "epoch": payload.get("epoch") if keys else None,
        "has_input_projection": proj is not None,
        "input_projection.weight": list(proj.shape) if isinstance(proj, torch.Tensor) else None,
    }
    try:
        _, info = load_draft_checkpoint(path, trust=trust)
    except DraftCheckpointError as err:
        out.update(loads=False, error=str(err))
        return out
    cache = info.get("cache_manifest") or {}
    out.update(loads=True, num_parameters=info["num_parameters"], format=info["format"],
               model_config=info["model_config"], config_source=info["config_source"],
               backbone_id=cache.get("backbone_id"), tokenizer=cache.get("tokenizer"), suite=cache.get("suite"))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rsd.models.checkpoint",
                                     description="Inspect draft checkpoints (best_draft_with_projection.pt).")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="print keys, val_accuracy, epoch and the projection layer")
    p_inspect.add_argument("ckpt", help="a checkpoint path")
    p_inspect.add_argument("--json", action="store_true", help="print JSON")
    p_inspect.add_argument("--trust", action="store_true",
                           help="allow a file that needs full unpickling (runs code stored in it)")
    args = parser.parse_args(argv)
    try:
        out = inspect_checkpoint(args.ckpt, trust=args.trust)
    except DraftCheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return 0
    print(f"checkpoint: {out['path']}")
    print(f"keys: {out['keys']}")
    print(f"val_accuracy: {out['val_accuracy']}")
    print(f"epoch: {out['epoch']}")
    if out["has_input_projection"]:
        print(f"input_projection.weight: present, shape {tuple(out['input_projection.weight'])}")
    else:
        print("input_projection.weight: MISSING (not a draft model with projection)")
    if not out["loads"]:
        print(f"error: {out['error']}", file=sys.stderr)
        return 1
    print(f"parameters: {out['num_parameters']:,} ({out['format']} format, config {out['config_source']})")
    print(f"model config: {out['model_config']}")
    if out.get("backbone_id"):
        print(f"trained on: backbone {out['backbone_id']}, tokenizer {out['tokenizer']}, suite {out['suite']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
