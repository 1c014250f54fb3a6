"""``python -m rsd.prepare [prepare.until=<step>] [experiment=draft_proj]``: run pipeline steps alone.

Composes the training config (default ``experiment=draft_proj``, whose pipeline ends with ``distill``),
prints the plan and builds what is stale; ``prepare.until=cache`` stops after the feature cache.
``--plan`` prints the plan only; ``--adopt demos`` records existing demo files (e.g. official LIBERO ones) as
the demos artifact instead of collecting new ones.
"""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir

from rsd.prepare.pipeline import adopt, format_plan, plan, prepare
from rsd.utils.config import CONFIG_DIR


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    dry = "--plan" in args
    adopt_step = args[args.index("--adopt") + 1] if "--adopt" in args else None
    args = [a for i, a in enumerate(args) if a != "--plan" and a != "--adopt"
            and not (i and args[i - 1] == "--adopt")]
    if not any(a.startswith("experiment=") for a in args):
        args.insert(0, "experiment=draft_proj")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=args)
        if dry:
            print(format_plan(plan(cfg)))
            return 0
        if adopt_step:
            ref = adopt(cfg, adopt_step)
            print(f"adopted {ref['path']} as the {adopt_step} artifact ({ref['content_hash'][:16]})")
            return 0
        refs = prepare(cfg)
    for name, ref in refs.items():
        print(f"{name:<9} {ref['path']}  {ref['content_hash'][:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
