"""Draft distillation targets (a pipeline step: the pipeline writes training data, the engine only decodes).

``python -m rsd.prepare.distill --main <main_decoder.pt> --cache-dir <cache> [--out-dir <dir>] [--soft]`` writes
the main model's greedy tokens (``distill_tokens.npy`` + ``.json`` naming the main model) into ``--out-dir``
(default: the cache folder), which ``experiment=draft_proj_distill`` trains the draft on
(``data.targets=distill``). ``python train.py experiment=draft_proj`` runs this step itself
(``rsd.prepare``, step ``distill``, into ``data/distill/<main>/``).

With ``--soft`` it also writes ``distill_probs.npy`` (float16 ``[N, 3, 128, 7]``) + ``.json``: the main
model's distribution over each coarse layer's tokens, which ``experiment=draft_proj_distill_kl``
(``data.targets=distill_soft``) distils with a tempered KL. Layer ``k``'s distribution is computed given the
main model's OWN greedy layers ``< k`` (the rows of ``distill_tokens.npy``), in one teacher-forced call:
under strict acceptance an accepted drafted prefix equals exactly that greedy prefix, so these are the
distributions verification compares the draft against at every layer it can still accept. (Given a
rejected prefix nothing later is accepted, so other prefixes do not matter for acceptance.)

The stored probabilities are temperature-free: ``softmax(logits)`` at temperature 1 of the main model's
float32 logits; a student tempers them itself (``rsd.models.lit_draft.tempered_teacher``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd.data.cache import CacheError, open_cache
from rsd.engine.rsd_engine import greedy_tokens
from rsd.models.main_decoder import load_main_decoder
from rsd.utils.artifacts import file_sha256

TOKENS_FILE = "distill_tokens.npy"
PROBS_FILE = "distill_probs.npy"
#: how the stored probabilities are defined (recorded in the sidecar, checked by nothing but people)
PROBS_DEFINITION = ("probs[i, k, p, v] = softmax over v of the main model's float32 logits of layer k at "
                    "position p for cache frame i, temperature 1, given hidden[i] and the main model's own "
                    "greedy layers < k (distill_tokens.npy[i, :k], one teacher-forced call main(hidden, "
                    "tokens[:, :K-1])): the prefix strict verification accepts. Stored as float16 (rows sum "
                    "to 1 within 2**-11).")


def cache_fingerprint(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What a targets file records about its cache, so a datamodule can refuse one made for another cache."""
    return {"backbone_id": manifest["backbone"]["id"], "tokenizer": manifest["tokenizer"]["identity"],
            "num_frames": int(manifest["num_frames"]), "created": manifest.get("created")}


def teacher_probs(main: torch.nn.Module, hidden: torch.Tensor, greedy: torch.Tensor,
                  num_layers: int = 3) -> torch.Tensor:
    """``[B, num_layers, P, V]`` float32: layer ``k``'s softmax given ``greedy[:, :k]`` (the main model's own
    greedy layers ``[B, >=num_layers-1, P]``), all layers in one teacher-forced call."""
    with torch.inference_mode():
        logits = main(hidden, greedy[:, : num_layers - 1].long())
    return logits[:, :num_layers].float().softmax(dim=-1)


def write_distill_tokens(main: torch.nn.Module, cache_dir: str | os.PathLike, batch_size: int = 256,
                         device: torch.device | str | None = None, source: Mapping[str, Any] | None = None,
                         out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``{out_dir}/distill_tokens.npy`` (uint8 ``[N, 8, 128]``, one row per cache frame; ``out_dir``
    defaults to the cache folder): the main model's greedy tokens, which
    ``FeatureCacheDataModule(targets="distill")`` trains the draft on.

    ``distill_tokens.json`` next to it records ``source`` (which main model made them) and the cache's
    frame count, so a draft trained on them can say which main model it imitates."""
    manifest, arrays = open_cache(cache_dir)
    d = int(manifest["backbone"]["hidden_dim"])
    if getattr(main, "input_dim", d) != d:
        raise CacheError(f"feature cache {cache_dir} has hidden size {d}, the main decoder expects {main.input_dim}")
    tokens = greedy_tokens(main, arrays["hidden"], batch_size, device)
    out = Path(out_dir) if out_dir is not None else Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENS_FILE
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, tokens)
    os.replace(tmp, path)
    info = {"main": dict(source or {}), "num_frames": int(tokens.shape[0]), "shape": list(tokens.shape),
            "cache": cache_fingerprint(manifest), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return path


def write_distill_probs(main: torch.nn.Module, cache_dir: str | os.PathLike, batch_size: int = 256,
                        device: torch.device | str | None = None, source: Mapping[str, Any] | None = None,
                        num_layers: int = 3, tokens_path: str | os.PathLike | None = None,
                        out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``{out_dir}/distill_probs.npy`` (``out_dir`` defaults to the cache folder) (float16 ``[N, num_layers, 128, 7]``, see the module docstring)
    from the greedy tokens in ``distill_tokens.npy`` (written first by ``write_distill_tokens`` with the same
    main model), streamed through a memory map so neither file is ever held in memory whole.

    ``distill_probs.json`` records the main model (``source``), the tokens file it was conditioned on, the
    cache's fingerprint and the definition; ``argmax_mismatch`` is the fraction of tokens whose float32 argmax
    differs from the greedy token (near-ties computed through another matrix shape, or float16 ties)."""
    cache_dir = Path(cache_dir)
    out_dir = Path(out_dir) if out_dir is not None else cache_dir
    manifest, arrays = open_cache(cache_dir)
    hidden_all = arrays["hidden"]
    n, d = hidden_all.shape
    if getattr(main, "input_dim", d) != d:
        raise CacheError(f"feature cache {cache_dir} has hidden size {d}, the main decoder expects {main.input_dim}")
    tokens_path = Path(tokens_path) if tokens_path else out_dir / TOKENS_FILE
    if not tokens_path.is_file():
        raise CacheError(f"{tokens_path} is missing: soft targets are conditioned on the main model's greedy "
                         "tokens; write them first (`python -m rsd.prepare.distill --soft` does both)")
    tokens = np.load(tokens_path, mmap_mode="r")
    if tokens.ndim != 3 or tokens.shape[0] != n or tokens.shape[1] < num_layers - 1:
        raise CacheError(f"{tokens_path} has shape {tokens.shape}, expected [{n}, >={num_layers - 1}, P]")
    sidecar = tokens_path.with_suffix(".json")
    made_by = (json.loads(sidecar.read_text()).get("main") or {}) if sidecar.is_file() else {}
    if source and made_by.get("sha256") and source.get("sha256") and made_by["sha256"] != source["sha256"]:
        raise CacheError(f"{tokens_path} was written by main model {made_by} but the soft targets would come from "
                         f"{dict(source)}: rewrite both with one `python -m rsd.prepare.distill --soft` call")
    main = main.to(device).eval() if device is not None else main.eval()
    ref = next(main.parameters())
    p, v = int(main.num_positions), int(main.num_levels)
    path = out_dir / PROBS_FILE
    tmp = path.with_name(path.name + ".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, num_layers, p, v))
    mismatched = 0
    try:
        for i in range(0, n, batch_size):
            h = torch.from_numpy(np.array(hidden_all[i:i + batch_size], dtype=np.float32)).to(ref.device, ref.dtype)
            g = torch.from_numpy(np.array(tokens[i:i + batch_size, : max(num_layers - 1, 1)])).to(ref.device)
            probs = teacher_probs(main, h, g, num_layers).cpu()
            out[i:i + batch_size] = probs.numpy().astype(np.float16)
            greedy = torch.from_numpy(np.array(tokens[i:i + batch_size, :num_layers])).long()
            mismatched += int((probs.argmax(-1) != greedy).sum())
        out.flush()
    except BaseException:
        del out
        tmp.unlink(missing_ok=True)  # no half-written file next to the cache
        raise
    del out
    os.replace(tmp, path)
    info = {"main": dict(source or made_by), "tokens": {"path": str(tokens_path.resolve()),
                                                         "sha256": file_sha256(tokens_path, 16)},
            "cache": cache_fingerprint(manifest), "num_frames": int(n), "shape": [int(n), num_layers, p, v],
            "dtype": "float16", "temperature": 1.0, "definition": PROBS_DEFINITION,
            "argmax_mismatch": mismatched / max(n * num_layers * p, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Write the main model's greedy tokens (and with --soft its coarse-layer "
                                "distributions) next to a feature cache (draft distillation targets): python -m "
                                "rsd.prepare.distill --main data/models/<main>/main_decoder.pt --cache-dir "
                                "data/cache/<name> [--out-dir <dir>] [--soft]")
    p.add_argument("--main", required=True, help="main_decoder.pt")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--out-dir", default=None, help="where to write the targets (default: the cache folder)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--soft", action="store_true",
                   help="also write distill_probs.npy (float16 [N, 3, 128, 7]) for data.targets=distill_soft")
    p.add_argument("--soft-layers", type=int, default=3, help="coarse layers in distill_probs.npy (the draft's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    decoder = load_main_decoder(args.main, map_location=args.device)
    source = {"path": str(Path(args.main).resolve()), "sha256": file_sha256(args.main, 16)}
    path = write_distill_tokens(decoder, args.cache_dir, args.batch_size, args.device, source=source,
                                out_dir=args.out_dir)
    print(f"written {path}")
    if args.soft:
        path = write_distill_probs(decoder, args.cache_dir, args.batch_size, args.device, source=source,
                                   num_layers=args.soft_layers, out_dir=args.out_dir)
        info = json.loads(path.with_suffix(".json").read_text())
        print(f"written {path} (argmax differs from the greedy token on {info['argmax_mismatch']:.2e} of tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
