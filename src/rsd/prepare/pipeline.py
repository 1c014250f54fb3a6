"""The pipeline: every artifact a training run needs, built in data-flow order, each skipped when up to date.

    demos -> tokenizer -> cache -> main -> distill   (then train.py fits the experiment's own model: the draft)

Each step is one function that declares its inputs (earlier steps), its output folder and the settings that
decide the output (``conf/prepare/default.yaml``). A step is *up to date* when its folder holds an
``artifact.json`` (:mod:`rsd.utils.artifacts`) of the right kind whose recorded settings equal the requested
ones, whose recorded inputs are the current inputs' content hashes, and whose files still have the recorded
hashes. Anything else (no folder, no manifest, other settings, an input rebuilt, a file changed) rebuilds the
step. :func:`prepare` prints the plan before it starts, then builds what is stale, re-checking each step just
before it runs (an input rebuilt to identical content leaves the steps after it up to date).

``python -m rsd.prepare`` runs the steps alone (``prepare.until=<step>``: up to that step).
"""

from __future__ import annotations

import datetime as _dt
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from rsd.data.cache import build_cache
from rsd.data.collect import collect_suite
from rsd.fit import fit
from rsd.models.backbones import backbone_from_config
from rsd.models.main_decoder import load_main_decoder
from rsd.prepare.config import STEP_ORDER
from rsd.prepare.distill import PROBS_FILE, TOKENS_FILE, write_distill_probs, write_distill_tokens
from rsd.utils.artifacts import (
    artifact_ref,
    canonical_hash,
    file_sha256,
    read_artifact,
    verify_artifact,
    write_artifact,
)
from rsd.utils.config import CONFIG_DIR

log = logging.getLogger("rsd.prepare")

TOKENIZER_FILE = "rfsq.pt"
MAIN_FILE = "main_decoder.pt"


class PipelineError(RuntimeError):
    """A step cannot be planned or built (the message says what to do)."""


@dataclass
class Step:
    """One artifact to make: where it goes, from what, with which settings, and how."""

    name: str
    folder: Path
    inputs: tuple[str, ...]
    config: dict[str, Any]
    build: Callable[[Mapping[str, dict]], list[str] | None]  # input refs -> files of the artifact (None: all)
    status: str = ""  # "up to date" | why it must be built
    seconds: float | None = None
    manifest: dict[str, Any] | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------------------ config
def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def steps_until(until: str | None) -> tuple[str, ...]:
    """The steps a run needs: every step up to and including ``until`` (none for null)."""
    if until in (None, "", "none"):
        return ()
    if until not in STEP_ORDER:
        raise ValueError(f"prepare.until must be one of {STEP_ORDER} or null, got {until!r}")
    return STEP_ORDER[: STEP_ORDER.index(until) + 1]


def _path(refs: Mapping[str, dict], name: str) -> Path:
    return Path(refs[name]["path"])


def tokenizer_file(tokenizer_dir: str | Path) -> Path:
    return Path(tokenizer_dir) / TOKENIZER_FILE


def _nested_run(cfg: DictConfig, experiment: str, overrides: list[str]) -> DictConfig:
    """Compose ``experiment`` with this run's paths and backbone, preparing nothing itself (this pipeline did)."""
    paths = cfg.paths
    args = [f"experiment={experiment}", "prepare.until=null",
            *(f"paths.{k}={paths[k]}" for k in ("data_dir", "log_dir", "demos_dir", "tokenizer_dir", "cache_dir",
                                                "models_dir", "distill_dir")),
            *overrides]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=args)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=args)


def _run_dir(cfg: DictConfig, task: str) -> Path:
    return Path(cfg.paths.log_dir) / task / "runs" / _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


# ------------------------------------------------------------------------------------------------ steps
def make_steps(cfg: DictConfig) -> dict[str, Step]:
    """The steps ``cfg.prepare`` asks for (up to ``prepare.until``), unresolved parts left untouched."""
    p = cfg.prepare
    names = steps_until(p.get("until"))
    suite = str(p.suite)
    steps: dict[str, Step] = {}
    progress = bool(p.get("progress", True))

    if "demos" in names:
        d = p.demos
        demos_cfg = {"suite": suite, "per_task": int(d.per_task), "tasks": _plain(d.tasks),
                     "scene_seed": int(d.scene_seed), "init_source": "generated"}
        noise = float(d.get("action_noise", 0.0))
        if noise:  # only then, so clean demos keep the identity they had before the option existed
            demos_cfg["action_noise"] = noise
        task_demos = {int(t): int(n) for t, n in (_plain(d.get("task_demos")) or {}).items()}
        if task_demos:  # likewise: only then
            demos_cfg["task_demos"] = {str(t): n for t, n in sorted(task_demos.items())}

        def build_demos(_: Mapping[str, dict]) -> list[str]:
            folder = Path(d.dir)
            collect_suite(suite, int(d.per_task), tasks=_plain(d.tasks), workers=int(d.workers),
                          out_dir=str(folder.parent), overwrite=True, progress=progress,
                          scene_seed=int(d.scene_seed), action_noise=noise, task_demos=task_demos)
            if folder.name != suite:
                raise ValueError(f"prepare.demos.dir must end with the suite name ({suite}), got {folder}")
            return sorted(f.name for f in folder.glob("*_demo.hdf5"))

        steps["demos"] = Step("demos", Path(d.dir), (), demos_cfg, build_demos)

    if "tokenizer" in names:
        t = p.tokenizer
        tok_cfg = {"suite": suite, "overrides": list(_plain(t.overrides) or [])}

        def build_tokenizer(inputs: Mapping[str, dict]) -> list[str]:
            out = tokenizer_file(t.dir)
            run_cfg = _nested_run(cfg, "rfsq", [
                f"data.suite={suite}", f"data.demos_dir={_path(inputs, 'demos').parent}",
                f"callbacks.export_tokenizer.out_path={out}", f"paths.output_dir={_run_dir(cfg, 'rfsq')}",
                "logger=csv", *tok_cfg["overrides"]])
            fit(run_cfg, inputs)
            if not out.is_file():
                raise FileNotFoundError(f"tokenizer training finished but {out} was not written")
            return [TOKENIZER_FILE]

        steps["tokenizer"] = Step("tokenizer", Path(t.dir), ("demos",), tok_cfg, build_tokenizer)

    if "cache" in names:
        c = p.cache
        cache_cfg = {"suite": suite, "backbone": _plain(c.backbone), "hidden_dtype": str(c.hidden_dtype),
                     "val_fraction": float(c.val_fraction), "max_demos_per_task": _plain(c.max_demos_per_task)}

        def build_feature_cache(inputs: Mapping[str, dict]) -> None:
            build_cache(suite, c.dir, tokenizer_file(_path(inputs, "tokenizer")), _path(inputs, "demos").parent,
                        backbone_from_config(cache_cfg["backbone"] or {"name": "sim_state"}), overwrite=True,
                        hidden_dtype=cache_cfg["hidden_dtype"], max_demos_per_task=cache_cfg["max_demos_per_task"],
                        val_fraction=cache_cfg["val_fraction"], progress=progress)
            return None

        steps["cache"] = Step("cache", Path(c.dir), ("demos", "tokenizer"), cache_cfg, build_feature_cache)

    if "main" in names:
        m = p.main
        main_cfg = {"experiment": str(m.experiment), "overrides": list(_plain(m.overrides) or [])}

        def build_main(inputs: Mapping[str, dict]) -> list[str]:
            run_dir = _run_dir(cfg, "main_head")
            run_cfg = _nested_run(cfg, main_cfg["experiment"], [
                f"data.suite={suite}", f"data.cache_dir={_path(inputs, 'cache')}",
                f"data.tokenizer_path={tokenizer_file(_path(inputs, 'tokenizer'))}", f"paths.output_dir={run_dir}",
                *([f"logger={m.logger}"] if m.get("logger") else []), *main_cfg["overrides"]])
            fit(run_cfg, inputs)
            exported = run_dir / MAIN_FILE
            if not exported.is_file():
                raise FileNotFoundError(f"main model training finished but {exported} was not written")
            folder = Path(m.dir)
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(exported, folder / MAIN_FILE)
            return [MAIN_FILE]

        steps["main"] = Step("main", Path(m.dir), ("cache", "tokenizer"), main_cfg, build_main)

    if "distill" in names:
        s = p.distill
        distill_cfg = {"batch_size": int(s.batch_size), "soft_layers": int(s.soft_layers)}

        def build_distill(inputs: Mapping[str, dict]) -> list[str]:
            main_path = _path(inputs, "main") / MAIN_FILE
            decoder = load_main_decoder(main_path)
            source = {"path": str(main_path), "sha256": file_sha256(main_path, 16),
                      "content_hash": inputs["main"]["content_hash"]}
            out, cache = Path(s.dir), _path(inputs, "cache")
            write_distill_tokens(decoder, cache, distill_cfg["batch_size"], source=source, out_dir=out)
            write_distill_probs(decoder, cache, distill_cfg["batch_size"], source=source,
                                num_layers=distill_cfg["soft_layers"], out_dir=out)
            return [TOKENS_FILE, Path(TOKENS_FILE).with_suffix(".json").name,
                    PROBS_FILE, Path(PROBS_FILE).with_suffix(".json").name]

        steps["distill"] = Step("distill", Path(s.dir), ("cache", "main"), distill_cfg, build_distill)

    return steps


# ------------------------------------------------------------------------------------------------ status
def step_status(step: Step, input_hashes: Mapping[str, str | None]) -> str:
    """``"up to date"`` or the reason ``step`` must be (re)built."""
    try:
        manifest = read_artifact(step.folder)
    except Exception as err:  # noqa: BLE001 - a corrupt manifest is a reason to rebuild, said as such
        return f"unreadable manifest ({err})"
    if manifest is None:
        if step.name == "demos" and any(step.folder.glob("*_demo.hdf5")):
            raise PipelineError(
                f"{step.folder} holds demonstrations the pipeline did not record (no artifact.json); it will not "
                f"overwrite them. Move them away to collect new ones, or use them as they are: `python -m "
                f"rsd.prepare --adopt demos` (records their hashes with the current settings).")
        return "missing" if not step.folder.exists() else "no artifact.json (made by an older version, or interrupted)"
    if manifest.get("kind") != step.name:
        return f"holds a {manifest.get('kind')!r} artifact"
    if canonical_hash(manifest.get("config")) != canonical_hash(step.config):
        return "settings changed"
    recorded = {k: (v or {}).get("content_hash") for k, v in (manifest.get("inputs") or {}).items()}
    for name in step.inputs:
        if input_hashes.get(name) is None:
            return f"input {name} will be rebuilt"
        if recorded.get(name) != input_hashes[name]:
            return f"input {name} changed"
    problems = verify_artifact(step.folder, manifest)
    if problems:
        return "; ".join(problems)
    step.manifest = manifest
    return "up to date"


def adopt(cfg: DictConfig, name: str) -> dict[str, Any]:
    """Record the existing files of step ``name`` (e.g. demos from elsewhere) as its artifact, with the current
    settings and inputs: the user vouches that they are what those settings would make."""
    steps = make_steps(cfg)
    if name not in steps:
        raise PipelineError(f"prepare.until={cfg.prepare.until} has no step {name!r} (steps: {list(steps)})")
    refs = {}
    for step in steps.values():
        if step.name == name:
            files = sorted(f.name for f in step.folder.glob("*_demo.hdf5")) if name == "demos" else None
            manifest = write_artifact(step.folder, name, config=step.config, files=files,
                                      inputs={k: refs[k] for k in step.inputs}, extra={"adopted": True})
            return artifact_ref(step.folder, manifest)
        if step_status(step, {k: v["content_hash"] for k, v in refs.items()}) != "up to date":
            raise PipelineError(f"adopting {name} needs its inputs up to date first; {step.name} is not")
        refs[step.name] = artifact_ref(step.folder, step.manifest)
    raise PipelineError(f"no step {name!r}")


def plan(cfg: DictConfig) -> list[Step]:
    """The steps of ``cfg.prepare`` with their status (nothing is built)."""
    steps = make_steps(cfg)
    hashes: dict[str, str | None] = {}
    for step in steps.values():
        step.status = step_status(step, hashes)
        hashes[step.name] = (step.manifest or {}).get("content_hash") if step.status == "up to date" else None
    return list(steps.values())


def format_plan(steps: list[Step]) -> str:
    width = max((len(s.name) for s in steps), default=4)
    lines = ["Pipeline (rsd.prepare), in data-flow order:"]
    for i, s in enumerate(steps, 1):
        mark = "ok   " if s.status == "up to date" else "BUILD"
        lines.append(f"  {i}. {mark} {s.name:<{width}}  {s.folder}  ({s.status})")
    return "\n".join(lines)


def prepare(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Build what ``cfg.prepare`` needs and is stale, printing the plan first. Returns ``{step: ref}`` with
    the path and content hash of every artifact (what the trained model records as its inputs)."""
    steps = plan(cfg)
    if not steps:
        return {}
    print(format_plan(steps), flush=True)
    refs: dict[str, dict[str, Any]] = {}
    todo = [s for s in steps if s.status != "up to date"]
    done = 0
    for step in steps:
        input_refs = {name: refs[name] for name in step.inputs}
        status = step_status(step, {k: v["content_hash"] for k, v in input_refs.items()})
        if status != "up to date":
            done += 1
            print(f"[prepare {done}/{len(todo)}] {step.name} -> {step.folder} ({status})", flush=True)
            t0 = time.time()
            files = step.build(input_refs)
            step.seconds = round(time.time() - t0, 1)
            step.manifest = write_artifact(step.folder, step.name, config=step.config, inputs=input_refs,
                                           files=files, extra={"build_seconds": step.seconds})
            log.info("%s built in %.0f s (%s)", step.name, step.seconds, step.manifest["content_hash"][:12])
        refs[step.name] = artifact_ref(step.folder, step.manifest)
    return refs
