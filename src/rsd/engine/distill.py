"""Draft distillation targets: ``python -m rsd.engine.distill --main <main_decoder.pt> --cache-dir <cache>``.

Writes the main model's greedy tokens next to a feature cache (``distill_tokens.npy`` + ``.json`` naming the
main model), which ``experiment=draft_proj_distill`` trains the draft on (``data.targets=distill``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rsd.engine.rsd_engine import write_distill_tokens


def main(argv: list[str] | None = None) -> int:
    import argparse

    from rsd.data.cache import file_sha256
    from rsd.models.main_decoder import load_main_decoder

    p = argparse.ArgumentParser(description="Write the main model's greedy tokens next to a feature cache "
                                "(draft distillation targets): python -m rsd.engine.distill --main "
                                "logs/main_head/runs/<time>/main_decoder.pt --cache-dir data/cache/<name>")
    p.add_argument("--main", required=True, help="main_decoder.pt")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    decoder = load_main_decoder(args.main, map_location=args.device)
    source = {"path": str(Path(args.main).resolve()), "sha256": file_sha256(args.main, 16)}
    path = write_distill_tokens(decoder, args.cache_dir, args.batch_size, args.device, source=source)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
