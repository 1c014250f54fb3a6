"""Closed-loop check of the RFSQ tokenizer: replay held-out demos with every action chunk tokenized.

    python scripts/tokenizer_replay_check.py --suite libero_spatial [--workers 2] [--num-layers 8]

For every held-out episode (``rsd.data.splits.is_validation_episode``, the split the tokenizer was
trained with), the LIBERO env is reset and put in the episode's recorded first state
(``env.set_init_state(states[0])``; the collector records after its warm-up, so no warm-up here), then

  (a) the original recorded actions are replayed, and
  (b) the actions are replayed chunk by chunk: every 8 steps the next 8 recorded actions go through
      ``tokenizer.encode -> tokenizer.decode`` (gripper binarized to -1/+1) and are executed open loop.

(``--start warmup`` instead starts from the task's fixed init state ``init_state_index`` plus the 10
no-op warm-up steps, exactly as the collector recorded.) Both runs get the same number of steps (the episode length, then ``--extra-hold-steps`` hold actions:
zero arm motion, last gripper command). Success is the env's ``done``. The script prints
``tokenized successes / original successes`` and their ratio (target >= 0.95) and writes a JSON report
(default: next to the tokenizer file, ``rfsq_{suite}.replay.json``). Exit code 1 when the ratio is
below ``--min-ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from rsd import PROJECT_ROOT


def tokenized_actions(tokenizer, actions: np.ndarray, num_layers: int | None = None) -> np.ndarray:
    """``[T, 7]`` -> ``[T, 7]``: chunks at steps 0, 8, 16, ... through encode -> decode, gripper binarized."""
    import torch

    from rsd.data.chunks import action_chunks

    chunk_len = tokenizer.chunk_len
    chunks = action_chunks(actions, chunk_len)[::chunk_len]  # [ceil(T/8), 8, 7], tail padded with holds
    with torch.no_grad():
        decoded = tokenizer.decode(tokenizer.encode(torch.from_numpy(chunks)), num_layers).numpy()
    out = decoded.reshape(-1, actions.shape[1])[: actions.shape[0]].astype(np.float64)
    out[:, -1] = np.where(out[:, -1] > 0, 1.0, -1.0)
    return out


def _hold(actions: np.ndarray, n: int) -> np.ndarray:
    hold = np.zeros((n, actions.shape[1]))
    hold[:, -1] = actions[-1, -1]
    return hold


def _replay(env, start_state: np.ndarray, actions: np.ndarray, warmup: int = 0) -> tuple[bool, int]:
    from rsd.envs.libero_env import reset_to_init_state

    reset_to_init_state(env, start_state, num_warmup_steps=warmup)
    for t, action in enumerate(actions):
        _, _, done, _ = env.step(action)
        if done:
            return True, t + 1
    return False, len(actions)


def run_task(suite: str, task_id: int, file: str, demos: list[str], tokenizer_path: str,
             num_layers: int | None, extra_hold_steps: int, start: str = "states0") -> list[dict]:
    """Replay ``demos`` of one task file (original and tokenized); one record per episode."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    import h5py
    import torch

    from rsd.envs.libero_env import NUM_WARMUP_STEPS, get_init_states, get_task, make_env
    from rsd.tokenizer import RFSQTokenizer

    torch.set_num_threads(1)
    tokenizer = RFSQTokenizer.load(tokenizer_path)
    env = make_env(get_task(suite, task_id))
    fixed_init_states = get_init_states(suite, task_id) if start == "warmup" else None
    records = []
    try:
        for demo in demos:
            rec: dict = {"key": f"{suite}/{task_id}/{demo}", "task_id": task_id, "demo": demo}
            t0 = time.perf_counter()
            try:
                with h5py.File(file, "r") as f:
                    g = f["data"][demo]
                    actions = np.asarray(g["actions"], dtype=np.float64)
                    states = np.asarray(g["states"], dtype=np.float64)
                    init_attr = g.attrs.get("init_state")
                    init_index = g.attrs.get("init_state_index")
                start_state, warmup = states[0], 0
                if init_attr is not None:
                    rec["init_state_equals_states0"] = bool(np.allclose(np.asarray(init_attr), start_state))
                if start == "warmup":
                    if init_index is None:
                        raise ValueError("--start warmup needs the demo attribute init_state_index")
                    start_state, warmup = fixed_init_states[int(init_index)], NUM_WARMUP_STEPS
                tok = tokenized_actions(tokenizer, actions.astype(np.float32), num_layers)
                hold = _hold(actions, extra_hold_steps)
                rec["length"] = int(actions.shape[0])
                rec["arm_mse_raw"] = float(np.mean((tok[:, :6] - actions[:, :6]) ** 2))
                rec["arm_max_abs_raw"] = float(np.max(np.abs(tok[:, :6] - actions[:, :6])))
                rec["gripper_flips"] = int(np.sum(tok[:, -1] != actions[:, -1]))
                rec["original_success"], rec["original_steps"] = _replay(
                    env, start_state, np.concatenate([actions, hold]), warmup)
                rec["tokenized_success"], rec["tokenized_steps"] = _replay(
                    env, start_state, np.concatenate([tok, hold]), warmup)
            except Exception as exc:  # noqa: BLE001 - recorded with its message, never counted silently
                rec["error"] = f"{type(exc).__name__}: {exc}"
                rec["traceback"] = traceback.format_exc(limit=3)
                rec.setdefault("original_success", False)
                rec.setdefault("tokenized_success", False)
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            records.append(rec)
    finally:
        env.close()
    return records


def held_out_episodes(suite: str, demos_dir: Path, val_fraction: float, split_seed: int,
                      split: str) -> list[tuple[int, str, list[str]]]:
    import h5py

    from rsd.data.action_chunks import _demo_sort_key, demo_files, task_ids_for_files
    from rsd.data.splits import is_validation_episode

    files = demo_files(demos_dir, suite)
    if not files:
        raise SystemExit(f"No demos in {demos_dir / suite}; collect them with "
                         f"`python -m rsd.data.collect suite={suite}`.")
    jobs = []
    for path, task_id in zip(files, task_ids_for_files(suite, files), strict=True):
        with h5py.File(path, "r") as f:
            names = sorted(f["data"].keys(), key=_demo_sort_key)
        if split == "val":
            names = [d for d in names if is_validation_episode(f"{suite}/{task_id}/{d}", val_fraction, split_seed)]
        if names:
            jobs.append((task_id, str(path), names))
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--tokenizer", default=None, help="default: data/tokenizers/rfsq_{suite}.pt")
    p.add_argument("--demos-dir", default=str(PROJECT_ROOT / "data" / "demos"))
    p.add_argument("--split", choices=["val", "all"], default="val")
    p.add_argument("--num-layers", type=int, default=None, help="decode from the first n layers (default all)")
    p.add_argument("--extra-hold-steps", type=int, default=20)
    p.add_argument("--max-episodes", type=int, default=None)
    p.add_argument("--start", choices=["states0", "warmup"], default="states0",
                   help="states0: set_init_state(states[0]) (the recorded first state); warmup: the task's fixed "
                        "init state init_state_index + the 10 no-op warm-up steps, as the collector recorded")
    p.add_argument("--workers", type=int, default=2, help="processes (0 = serial in this process)")
    p.add_argument("--min-ratio", type=float, default=0.95)
    p.add_argument("--out", default=None, help="JSON report (default: next to the tokenizer)")
    args = p.parse_args(argv)

    from rsd.tokenizer import RFSQTokenizer, TokenizerCheckpointError

    tok_path = Path(args.tokenizer or PROJECT_ROOT / "data" / "tokenizers" / f"rfsq_{args.suite}.pt")
    try:
        tokenizer = RFSQTokenizer.load(tok_path)
    except TokenizerCheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data_meta = tokenizer.metadata.get("data", {})
    val_fraction = float(data_meta.get("val_fraction", 0.1))
    split_seed = int(data_meta.get("split_seed", 0))
    jobs = held_out_episodes(args.suite, Path(args.demos_dir), val_fraction, split_seed, args.split)
    if args.max_episodes is not None:
        left, trimmed = args.max_episodes, []
        for task_id, file, demos in jobs:
            if left > 0:
                trimmed.append((task_id, file, demos[:left]))
                left -= len(trimmed[-1][2])
        jobs = trimmed
    n_eps = sum(len(d) for _, _, d in jobs)
    print(f"{args.suite}: replaying {n_eps} {'held-out' if args.split == 'val' else ''} episodes of {len(jobs)} "
          f"tasks with tokenizer {tok_path} ({tokenizer.identity()}), layers={args.num_layers or 'all'}",
          flush=True)

    t0 = time.time()
    records: list[dict] = []
    call = [(args.suite, t, f, d, str(tok_path), args.num_layers, args.extra_hold_steps, args.start)
            for t, f, d in jobs]
    if args.workers <= 0:
        for c in call:
            records += run_task(*c)
            print(f"  task {c[1]}: {sum(r['tokenized_success'] for r in records)}/"
                  f"{sum(r['original_success'] for r in records)} so far", flush=True)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_task, *c): c[1] for c in call}
            for fut in as_completed(futures):
                records += fut.result()
                print(f"  task {futures[fut]} done: {sum(r['tokenized_success'] for r in records)}/"
                      f"{sum(r['original_success'] for r in records)} so far", flush=True)
    records.sort(key=lambda r: (r["task_id"], r["demo"]))

    orig = sum(bool(r["original_success"]) for r in records)
    tokd = sum(bool(r["tokenized_success"]) for r in records)
    both = sum(bool(r["original_success"] and r["tokenized_success"]) for r in records)
    errors = [r for r in records if r.get("error")]
    ratio = tokd / orig if orig else float("nan")
    report = {
        "suite": args.suite,
        "tokenizer": str(tok_path),
        "identity": tokenizer.identity(),
        "num_layers": args.num_layers or tokenizer.num_layers,
        "split": args.split,
        "start": args.start,
        "episodes": len(records),
        "original_successes": orig,
        "tokenized_successes": tokd,
        "both_successes": both,
        "ratio": ratio,
        "target_ratio": args.min_ratio,
        "passed": bool(orig and ratio >= args.min_ratio),
        "errors": len(errors),
        "mean_arm_mse_raw": float(np.mean([r["arm_mse_raw"] for r in records if "arm_mse_raw" in r] or [np.nan])),
        "gripper_flips": int(sum(r.get("gripper_flips", 0) for r in records)),
        "extra_hold_steps": args.extra_hold_steps,
        "seconds": round(time.time() - t0, 1),
        "records": records,
    }
    out = Path(args.out) if args.out else tok_path.with_suffix("").with_name(tok_path.stem + ".replay.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nTokenizer replay check ({args.suite}, {len(records)} held-out episodes, "
          f"{report['num_layers']} layers, start={args.start}):")
    print(f"  original replay:  {orig}/{len(records)} succeeded")
    print(f"  tokenized replay: {tokd}/{len(records)} succeeded ({both} where the original also did)")
    print(f"  replayed success / original success = {tokd}/{orig} = {ratio:.3f} "
          f"(target >= {args.min_ratio}: {'PASS' if report['passed'] else 'FAIL'})")
    print(f"  mean arm action MSE (raw units) {report['mean_arm_mse_raw']:.2e}, gripper flips "
          f"{report['gripper_flips']}, errors {len(errors)}, {report['seconds']} s; report: {out}")
    for r in errors[:5]:
        print(f"  error in {r['key']}: {r['error']}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
