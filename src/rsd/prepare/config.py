"""The pipeline's settings and step names, checked before anything heavy is imported (entry points use it)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from rsd.envs.libero_env import MAX_STEPS
from rsd.utils.errors import ConfigError

#: The steps in data-flow order (a step's inputs are among the steps before it).
STEP_ORDER = ("demos", "tokenizer", "cache", "main", "distill")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive(cfg: DictConfig, path: str, low: float = 1, integer: bool = True, nullable: bool = True) -> None:
    node: Any = cfg
    for part in path.split("."):
        if node is None or not hasattr(node, "get"):
            return
        node = node.get(part)
    if node is None and nullable:
        return
    ok = is_int(node) if integer else (isinstance(node, int | float) and not isinstance(node, bool))
    if not ok or node < low:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{path}={node!r}: must be {kind} >= {low}" + (" or null" if nullable else ""))


def check_prepare_config(cfg: DictConfig) -> None:
    """The pipeline's settings (``prepare.*``), before any step runs."""
    p = cfg.get("prepare")
    if p is None:
        return
    until = p.get("until")
    if until not in (None, "", "none", *STEP_ORDER):
        raise ConfigError(f"prepare.until={until!r}: must be null or one of {'|'.join(STEP_ORDER)}")
    if p.get("suite") not in MAX_STEPS:
        raise ConfigError(f"prepare.suite={p.get('suite')!r} (from data.suite): unknown; one of {'|'.join(MAX_STEPS)}")
    positive(cfg, "prepare.demos.per_task")
    task_demos = p.demos.get("task_demos")
    if task_demos is not None:
        if not isinstance(task_demos, DictConfig):
            raise ConfigError(f"prepare.demos.task_demos={task_demos!r}: must be a mapping {{task_id: demos}} or null")
        for tid, n in task_demos.items():
            if not str(tid).isdigit() or not is_int(n) or n < 1:  # ids are range-checked by the collector
                raise ConfigError(f"prepare.demos.task_demos={dict(task_demos)!r}: keys are task ids, values "
                                  "integers >= 1")
    positive(cfg, "prepare.demos.workers", low=0)  # 0: collect in this process
    positive(cfg, "prepare.distill.batch_size")
    positive(cfg, "prepare.distill.soft_layers")
