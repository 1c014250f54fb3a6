"""``python -m rsd.prepare [prepare.until=<step>] [experiment=draft_proj]``: run pipeline steps alone.

Composes the training config (default ``experiment=draft_proj``, whose pipeline ends with ``distill``),
prints the plan and builds what is stale; ``prepare.until=cache`` stops after the feature cache.
``--plan`` prints the plan only; ``--adopt demos`` records existing demo files (e.g. official LIBERO ones) as
the demos artifact instead of collecting new ones.

The config is checked before the pipeline is imported (:func:`rsd.prepare.config.check_prepare_config`); a bad value or a
missing file is one line on stderr with a non-zero exit (:mod:`rsd.utils.errors`).
"""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from rsd.prepare.config import STEP_ORDER, check_prepare_config
from rsd.utils.config import CONFIG_DIR
from rsd.utils.errors import ConfigError, report_errors

PROGRAM = "python -m rsd.prepare"


def _run(args: list[str]) -> int:
    dry = "--plan" in args
    adopt_step = None
    if "--adopt" in args:
        i = args.index("--adopt")
        if i + 1 >= len(args) or args[i + 1] not in STEP_ORDER:
            raise ConfigError(f"--adopt needs a step: one of {'|'.join(STEP_ORDER)} (e.g. --adopt demos)")
        adopt_step = args[i + 1]
    args = [a for i, a in enumerate(args) if a != "--plan" and a != "--adopt"
            and not (i and args[i - 1] == "--adopt")]
    unknown = [a for a in args if a.startswith("-")]
    if unknown:
        raise ConfigError(f"unknown flag {unknown[0]}: the flags are --plan and --adopt <step>; the rest are Hydra "
                          "overrides (prepare.until=cache)")
    if not any(a.startswith("experiment=") for a in args):
        args.insert(0, "experiment=draft_proj")
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=args)
        check_prepare_config(cfg)
        # lazy: keeps torch out of the config check (a bad config fails in < 1 s)
        from rsd.prepare.pipeline import adopt, format_plan, plan, prepare

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


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    with report_errors(PROGRAM):
        return _run(args)
    return 1  # pragma: no cover - report_errors exits


if __name__ == "__main__":
    raise SystemExit(main())
