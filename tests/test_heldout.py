"""Held-out evaluation: demos from generated scenes, start scenes in the cache, the evaluation's refusal."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from rsd.data.cache import write_cache
from rsd.data.heldout import (
    SAME_SCENE_TOL,
    TrainStatesError,
    nearest_scene,
    overlaps,
    scene_distances,
    training_scenes,
    write_start_states,
)
from rsd.eval.runner import check_held_out

SUITE = "libero_spatial"


def _cache_with_scenes(folder: Path, scenes: list[np.ndarray], task_ids: list[int],
                       official_index: list[int | None]) -> Path:
    """A tiny cache whose manifest/start_states record the given episode start scenes."""
    n_ep, length = len(scenes), 4
    n = n_ep * length
    episodes = [{"key": f"{SUITE}/{t}/demo_{i}", "task_id": t, "split": "val" if i == 0 else "train",
                 "init_source": "official" if j is not None else "generated", "init_state_index": j}
                for i, (t, j) in enumerate(zip(task_ids, official_index, strict=True))]
    manifest = {"backbone": {"name": "sim_state", "id": "test", "hidden_dim": 8, "config": {}}, "suite": SUITE,
                "tasks": [], "episodes": episodes, "tokenizer": {"identity": "t"}}
    write_cache(folder, np.zeros((n, 8), np.float16), np.zeros((n, 8, 128), np.uint8),
                np.zeros((n, 8, 7), np.float32), np.repeat(np.arange(n_ep), length),
                np.repeat(task_ids, length).astype(np.int16), np.repeat([int(i == 0) for i in range(n_ep)], length),
                manifest)
    write_start_states(folder, episodes, scenes)
    return folder


def test_scene_distance_ignores_time_and_finds_the_nearest() -> None:
    a = np.array([5.0, 0.1, 0.2, 0.3])
    others = np.array([[0.0, 0.1, 0.2, 0.3], [0.0, 0.1, 0.25, 0.3]])
    assert np.allclose(scene_distances(a, others), [0.0, 0.05])
    assert nearest_scene(a, others[::-1]) == (1, 0.0)


def test_overlaps_by_recorded_index_and_by_scene(tmp_path: Path) -> None:
    pytest.importorskip("libero")
    from rsd.envs.libero_env import get_init_states

    official = get_init_states(SUITE, 0)
    moved = official[3].copy()
    moved[10] += 0.05  # a generated scene: 5 cm from official state 3 along one coordinate
    cache = _cache_with_scenes(tmp_path / "c", [official[1] + 1e-9, moved, official[7]], [0, 0, 0], [None, None, 7])
    scenes = training_scenes(cache)
    assert scenes.states is not None and scenes.states.shape == (3, official.shape[1])
    found, unknown = overlaps(SUITE, [(0, i) for i in range(10)], [cache])
    assert unknown == []
    # state 1: the same scene (1e-9 away); state 7: a demo recorded from official index 7; state 3 is 5 cm away
    assert sorted(f["trial"] for f in found) == [1, 7]
    assert all(f["task_id"] == 0 for f in found)
    assert SAME_SCENE_TOL < 0.05


def test_check_held_out_refuses_and_marks(tmp_path: Path) -> None:
    pytest.importorskip("libero")
    from rsd.envs.libero_env import get_init_states

    official = get_init_states(SUITE, 0)
    cache = _cache_with_scenes(tmp_path / "c", [official[0], official[5] + 0.02], [0, 0], [None, None])
    with pytest.raises(TrainStatesError, match="1 of 3 evaluation init states.*allow_train_states=true"):
        check_held_out(SUITE, [0], [0, 1, 2], [str(cache)])
    verdict = check_held_out(SUITE, [0], [0, 1, 2], [str(cache)], allow_train_states=True)
    assert verdict["status"] == "not_held_out" and verdict["overlapping_episodes"] == 1
    assert verdict["line"].startswith("WARNING: NOT A HELD-OUT EVALUATION")
    ok = check_held_out(SUITE, [0], [1, 2, 3], [str(cache)])
    assert ok["status"] == "held_out" and ok["overlapping_episodes"] == 0
    # a cache without recorded start scenes cannot prove anything: refused too
    (cache / "start_states.npy").unlink()
    import json

    manifest = json.loads((cache / "manifest.json").read_text())
    for e in manifest["episodes"]:
        e.pop("init_source"), e.pop("init_state_index")
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainStatesError, match="cannot be checked"):
        check_held_out(SUITE, [0], [1], [str(cache)])
    # start scenes present but of unknown origin (no init_source): still unverifiable, never passed silently
    write_start_states(cache, manifest["episodes"], [official[0] + 0.02, official[5] + 0.02])
    with pytest.raises(TrainStatesError, match="record no start scene origin"):
        check_held_out(SUITE, [0], [1], [str(cache)])


def test_summary_first_line_says_not_held_out() -> None:
    from rsd.eval.summary import format_guide_summary, summarize, task_table_markdown

    rec = {"task_id": 0, "trial": 0, "mode": "baseline", "success": True, "steps": 10, "inference_times_ms": [1.0],
           "engine_stats": {}, "suite": SUITE, "task_name": "t", "error": None, "wall_time_s": 1.0}
    line = "WARNING: NOT A HELD-OUT EVALUATION (allow_train_states=true): test"
    summary = summarize([rec], suite=SUITE, extra={"heldout": {"status": "not_held_out", "line": line}})
    assert format_guide_summary(summary).splitlines()[0] == line
    assert task_table_markdown(summary).splitlines()[0] == line


def test_generated_demos_record_their_scene_and_avoid_official_states(tmp_path: Path) -> None:
    """One generated-scene demo in the real simulator: seed and scene recorded, the scene reproducible from
    the seed, far from every official init state; an official-state file says it is not held out."""
    pytest.importorskip("libero")
    from rsd.data.collect import collect_suite, scene_seed_for
    from rsd.envs.libero_env import get_init_states, get_task, make_env

    out = tmp_path / "demos"
    summary = collect_suite(SUITE, demos_per_task=1, tasks=[0], workers=0, out_dir=out, progress=False)
    assert summary["tasks"][0]["init_source"] == "generated" and summary["successes"] == 1
    path = next((out / SUITE).glob("*_demo.hdf5"))
    with h5py.File(path) as f:
        assert f["data"].attrs["rsd_init_source"] == "generated"
        demo = f["data/demo_0"]
        seed, scene = int(demo.attrs["rsd_scene_seed"]), np.asarray(demo.attrs["rsd_scene_state"])
        assert "init_state_index" not in demo.attrs
    assert seed == scene_seed_for(100_000, 0, 0)
    official = get_init_states(SUITE, 0)
    assert scene_distances(scene, official).min() > SAME_SCENE_TOL
    env = make_env(get_task(SUITE, 0))
    try:  # the recorded seed redraws the recorded scene (same simulator build)
        env.seed(seed)
        env.reset()
        again = env.sim.get_state().flatten()
    finally:
        env.close()
    assert scene_distances(scene, again[None])[0] < 1e-9

    off = collect_suite(SUITE, demos_per_task=1, tasks=[0], workers=0, out_dir=tmp_path / "off", progress=False,
                        init_source="official")
    assert off["tasks"][0]["init_source"] == "official"
    with h5py.File(next((tmp_path / "off" / SUITE).glob("*_demo.hdf5"))) as f:
        assert f["data"].attrs["rsd_init_source"] == "official" and "rsd_heldout_warning" in f["data"].attrs
        assert int(f["data/demo_0"].attrs["init_state_index"]) == 0
    # a generated collection does not accept the official file as already collected
    from rsd.data.collect import _existing_stats

    assert _existing_stats(next((tmp_path / "off" / SUITE).glob("*_demo.hdf5")), 1, False, "generated") is None
