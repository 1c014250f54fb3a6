"""Evaluation entry point: ``python evaluate.py ckpt=best trials=50`` (see conf/eval.yaml).

Runs the suite's tasks under the OpenVLA / OpenVLA-OFT protocol with the speculative engine (or the
baseline, or both on the same init states), appends every episode to ``<out_dir>/episodes.jsonl`` (a rerun
with the same ``out_dir`` resumes), then writes and prints the summary and logs it to Weights & Biases.
The init states must be held out from the models' training data (``rsd.eval.start_states.check_held_out``);
the summary names every artifact it loaded (path, sha256, artifact content hash), the code commit and the machine.

Order: check the config (:func:`check_eval_config`, before any file is loaded or any model module imported) ->
make the policy spec (``policy=<name>``: conf/policy/<name>.yaml; ``ckpt: best`` resolved once) -> run. A bad
value, a missing file or a policy that cannot be built stops the run with one line on stderr
(:mod:`rsd.utils.errors`; ``HYDRA_FULL_ERROR=1``: the traceback); only an episode's own failure is recorded as
a failed episode.
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

from rsd.analysis.sequential import PairedStop
from rsd.envs.libero_env import INIT_SOURCES, MAX_STEPS
from rsd.eval.shard import parse_shard, shard_dirname
from rsd.policies.base import EVAL_MODES
from rsd.policies.registry import check_policy_spec
from rsd.utils.artifacts import code_version, cpu_model, file_sha256, read_artifact
from rsd.utils.config import CONFIG_DIR
from rsd.utils.errors import ConfigError, check_composition, report_errors

# the runner, the summaries and the policies' models are imported in evaluate(), after the config is checked

log = logging.getLogger("evaluate")

if not OmegaConf.has_resolver("rsd_first"):
    # ``${rsd_first:a,b}``: the first argument that is not null (out_dir, else a new run folder)
    OmegaConf.register_new_resolver("rsd_first", lambda *args: next((a for a in args if a is not None), None))


#: Tasks per suite (LIBERO's benchmark; the runner re-checks against it) and init states per task.
SUITE_TASKS = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
INIT_STATES = 50
PROGRAM = "evaluate.py"


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
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "host": platform.node(),
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(_is_int(v) for v in value)


def check_eval_config(cfg: DictConfig) -> None:
    """Every setting of an evaluation, before any file is loaded: raises :class:`ConfigError` (or
    ``FileNotFoundError`` for a named file that does not exist) with the key, the value and the fix."""
    suite = cfg.get("suite")
    if suite not in MAX_STEPS:
        raise ConfigError(f"suite={suite!r}: unknown; one of {'|'.join(MAX_STEPS)}")
    n_tasks = SUITE_TASKS.get(suite)
    tasks = _container(cfg.get("tasks"))
    if tasks is not None:
        if _is_int(tasks):
            tasks = [tasks]
        if not _int_list(tasks) or not tasks:
            raise ConfigError(f"tasks={tasks!r}: must be null (every task) or a list of task ids, e.g. tasks=[0,3]")
        bad = [t for t in tasks if n_tasks is not None and not 0 <= t < n_tasks]
        if bad:
            raise ConfigError(f"tasks={tasks}: {suite} has tasks 0..{n_tasks - 1}; {bad} is out of range")
    init_source = cfg.get("init_source", "official")
    if init_source not in INIT_SOURCES:
        raise ConfigError(f"init_source={init_source!r}: must be official (the protocol's init states) or generated "
                          "(new scenes drawn with scene_seed: a selection set)")
    if not _is_int(cfg.get("scene_seed", 900_000)) or cfg.get("scene_seed", 900_000) < 0:
        raise ConfigError(f"scene_seed={cfg.get('scene_seed')!r}: must be an integer >= 0")
    n_states = INIT_STATES if init_source == "official" else 1000
    trials = _container(cfg.get("trials"))
    if _is_int(trials):
        if not 1 <= trials <= n_states:
            raise ConfigError(f"trials={trials}: must be 1..{n_states} (trial i starts from init state i) or a "
                              f"list of trial indices 0..{n_states - 1}")
    elif not _int_list(trials) or not trials or any(not 0 <= t < n_states for t in trials):
        raise ConfigError(f"trials={trials!r}: must be 1..{n_states} or a non-empty list of trial indices "
                          f"0..{n_states - 1}, e.g. trials=[0,5]")
    mode = cfg.get("mode")
    if mode not in (*EVAL_MODES, "both"):
        raise ConfigError(f"mode={mode!r}: must be one of {'|'.join((*EVAL_MODES, 'both'))}")
    for key, low in (("workers", 0), ("threads_per_worker", 1), ("max_steps", 1), ("max_episodes", 0)):
        value = cfg.get(key)
        if (key != "workers" and value is None) or (key == "workers" and value == "auto"):
            continue
        if not _is_int(value) or value < low:
            raise ConfigError(f"{key}={value!r}: must be an integer >= {low}"
                              + ("" if key == "workers" else " or null")
                              + (" (0 = run in this process) or auto" if key == "workers" else ""))
    video = _container(cfg.get("video"))
    if not (video is None or video == "all" or (_is_int(video) and video >= 0) or _int_list(video)):
        raise ConfigError(f"video={video!r}: must be null, N (first N trials of every task), a list of trials or all")
    device = str(cfg.get("device"))
    if device not in ("auto", "cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"device={device!r}: must be auto | cpu | cuda | cuda:<index> | mps")
    if cfg.get("wandb_mode") not in (None, "online", "offline", "disabled"):
        raise ConfigError(f"wandb_mode={cfg.get('wandb_mode')!r}: must be null, online, offline or disabled")
    for key in ("wandb", "retry_errors", "resume_check", "progress", "allow_train_states", "sequential"):
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(f"{key}={cfg.get(key)!r}: must be true or false")
    if cfg.get("sequential", False):
        if mode != "both":
            raise ConfigError(f"sequential=true compares two modes on the same init states: needs mode=both, "
                              f"got mode={mode}")
        if cfg.get("shard") is not None:
            raise ConfigError("sequential=true decides on the whole work list in one run: drop shard=...")
    alpha = cfg.get("sequential_alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise ConfigError(f"sequential_alpha={alpha!r}: must be a number in (0, 1), e.g. 0.05")
    if cfg.get("shard") is not None:
        try:
            parse_shard(cfg.shard)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    if cfg.get("policy") is None:
        raise ConfigError("no policy: use policy=<name> (conf/policy/: engine, vla_llm, expert, noop, replay)")
    if cfg.policy.get("baseline_depth") is not None and mode != "both":
        raise ConfigError(f"policy.baseline_depth={cfg.policy.baseline_depth} sets the baseline's depth in mode=both "
                          f"(a paired depth comparison); with mode={mode} use policy.depth")
    check_policy_spec(_container(cfg.policy))


def resolve_workers(workers: int | str, device: str, cpu_count: int | None = None) -> int:
    """``workers=auto``: one simulator process per CPU core (at most 8) when the models run on the CPU, where
    MuJoCo is single-threaded and the cores are the limit; one process on a GPU, which then holds one copy of
    the models. An integer is taken as it is."""
    if workers != "auto":
        return int(workers)
    if device == "auto":
        import torch  # lazy: the entry point's config checks run before torch is imported

        on_gpu = torch.cuda.is_available()
    else:
        on_gpu = device != "cpu"  # cuda, cuda:<i>, mps
    return 1 if on_gpu else max(1, min(cpu_count or os.cpu_count() or 1, 8))


def evaluate(cfg: DictConfig) -> dict:
    """Check ``cfg``, then run (or resume) its evaluation; returns the summary dict."""
    check_eval_config(cfg)
    # lazy: keeps torch and LIBERO out of the config check (a bad config fails in < 1 s)
    from rsd.eval.runner import run_evaluation
    from rsd.eval.summary import print_summary, summarize, write_summary
    from rsd.eval.wandb_log import log_to_wandb
    from rsd.policies.registry import resolve_policy_spec

    out_dir = output_dir(cfg)
    spec = resolve_policy_spec(_container(cfg.policy))
    log.info("Evaluating %s (%s) -> %s", cfg.suite, spec.get("factory"), out_dir)
    code = code_version()  # the code the episodes run with (taken before they start, not when they end)
    sequential = bool(cfg.get("sequential", False))
    stop = PairedStop(*EVAL_MODES, alpha=float(cfg.sequential_alpha)) if sequential else None
    run = run_evaluation(
        suite=cfg.suite, policy_spec=spec, out_dir=out_dir, tasks=_container(cfg.tasks),
        trials=_container(cfg.trials), mode=cfg.mode, workers=resolve_workers(cfg.workers, str(cfg.device)),
        max_steps=cfg.max_steps,
        video=_container(cfg.video), retry_errors=bool(cfg.retry_errors), max_episodes=cfg.max_episodes,
        progress=bool(cfg.progress), threads_per_worker=cfg.threads_per_worker,
        resume_check=bool(cfg.resume_check), shard=cfg.get("shard"),
        allow_train_states=bool(cfg.get("allow_train_states", False)),
        init_source=str(cfg.get("init_source", "official")), scene_seed=int(cfg.get("scene_seed", 900_000)),
        scenes_dir=cfg.paths.get("eval_scenes_dir"), order="trial" if sequential else "task", stop=stop,
    )
    log.info(run.heldout["line"])
    summary = summarize(run.records, suite=cfg.suite, extra={
        "out_dir": str(out_dir), "policy": spec, "complete": len(run.records) == run.total,
        "work_list_episodes": run.total, "new_episodes": run.new, "resumed_episodes": run.skipped,
        "max_steps": run.max_steps, "heldout": run.heldout, "artifacts": policy_artifacts(spec),
        "code": code, "machine": machine_info(),
        "init_source": str(cfg.get("init_source", "official")),
        **({"scene_seed": int(cfg.scene_seed)} if cfg.get("init_source") == "generated" else {}),
        **({"shard": str(cfg.shard)} if cfg.get("shard") is not None else {}),
        **({"sequential": stop.summary()} if stop is not None else {}),
    })
    write_summary(out_dir, summary)
    print_summary(summary)
    if not summary["complete"] and not (stop is not None and stop.done):  # a decided run is finished
        log.warning("%d of %d episodes done; rerun with out_dir=%s to finish", len(run.records), run.total,
                    out_dir)
    if cfg.wandb and run.records:
        log_to_wandb(summary, run.records, out_dir, config=_container(cfg), project=cfg.wandb_project,
                     group=cfg.suite, tags=_container(cfg.tags), mode=cfg.wandb_mode,
                     max_videos=int(cfg.wandb_max_videos))
    log.info("Results: %s", out_dir)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def hydra_main(cfg: DictConfig) -> float | None:
    # Ctrl-C must interrupt (and leave a resumable folder) even when started as a background job of a
    # non-interactive shell, which starts programs with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with report_errors(PROGRAM):
            summary = evaluate(cfg)
    except KeyboardInterrupt:
        log.warning("Interrupted. Finished episodes are in %s/episodes.jsonl; resume with "
                    "`python evaluate.py ... out_dir=%s`", output_dir(cfg), output_dir(cfg))
        sys.exit(130)
    first = next(iter(summary["modes"].values()), None)
    return first["success_rate"] if first else None


def main() -> float | None:
    """``python evaluate.py [overrides]``: the config is composed and checked before Hydra starts the job (no run
    folder for a bad value); errors a user can act on are one line (:mod:`rsd.utils.errors`)."""
    with report_errors(PROGRAM):
        check_composition("eval", sys.argv[1:], check_eval_config)
    return hydra_main()
