"""Scripted expert in the real LIBERO simulator and the LIBERO HDF5 demo schema.

The sim tests share one libero_spatial task-0 env and one expert episode (module fixtures), so the
whole file takes well under a minute and a half on two cores.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from rsd.data.libero_hdf5 import (
    IMAGE_OBS_KEYS,
    LOW_DIM_OBS_KEYS,
    DemoSchemaError,
    Episode,
    demo_path,
    read_demo_file,
    summarize_demo_file,
    validate_demo_file,
    write_demo_file,
)
from rsd.envs.libero_env import TaskSpec

SUITE = "libero_spatial"


def _synthetic_task(tmp_path) -> TaskSpec:
    bddl = tmp_path / "task.bddl"
    bddl.write_text(
        "(define (problem LIBERO_Tabletop_Manipulation)\n  (:domain robosuite)\n"
        "  (:language Pick the bowl and place it on the plate)\n"
        "  (:goal (And (On akita_black_bowl_1 plate_1)))\n)\n"
    )
    return TaskSpec(SUITE, 3, "pick_the_bowl_and_place_it_on_the_plate", "pick the bowl and place it on the plate",
                    str(bddl))


def _synthetic_episode(T: int, seed: int, images: bool = False) -> Episode:
    rng = np.random.default_rng(seed)
    obs = {
        "ee_pos": rng.normal(size=(T, 3)),
        "ee_ori": rng.normal(size=(T, 3)),
        "gripper_states": rng.normal(size=(T, 2)),
        "joint_states": rng.normal(size=(T, 7)),
    }
    obs["ee_states"] = np.concatenate([obs["ee_pos"], obs["ee_ori"]], axis=1)
    if images:
        for key in IMAGE_OBS_KEYS:
            obs[key] = rng.integers(0, 255, size=(T, 8, 8, 3), dtype=np.uint8)
    dones = np.zeros(T, dtype=np.uint8)
    dones[-1] = 1
    return Episode(
        actions=rng.uniform(-1, 1, size=(T, 7)),
        states=rng.normal(size=(T, 92)),
        obs=obs,
        robot_states=rng.normal(size=(T, 9)),
        rewards=dones.astype(np.float64),
        dones=dones,
        init_state_index=seed,
    )


# ----------------------------------------------------------------------------------------------------
# (b) schema: no simulator needed


def test_write_read_roundtrip_synthetic(tmp_path):
    task = _synthetic_task(tmp_path)
    episodes = [_synthetic_episode(12, 0, images=True), _synthetic_episode(7, 4, images=True)]
    path = write_demo_file(demo_path(tmp_path / "demos", SUITE, task.name), task, episodes, images=True)
    assert path == tmp_path / "demos" / SUITE / f"{task.name}_demo.hdf5"
    validate_demo_file(path, require_images=True)
    info = summarize_demo_file(path)
    assert info["num_demos"] == 2 and info["total"] == 19 and info["images"]
    demo = read_demo_file(path)
    assert demo.language == task.language
    assert demo.bddl_language == "pick the bowl and place it on the plate"
    assert demo.problem_info["problem_name"] == "libero_tabletop_manipulation"
    assert demo.env_args["bddl_file"] == task.bddl_file and "env_kwargs" in demo.env_args
    assert demo.attrs["num_demos"] == 2 and demo.attrs["total"] == 19
    assert [ep.init_state_index for ep in demo.episodes] == [0, 4]
    for src, ep in zip(episodes, demo.episodes, strict=True):
        np.testing.assert_array_equal(ep.actions, src.actions)
        np.testing.assert_array_equal(ep.states, src.states)
        np.testing.assert_array_equal(ep.init_state, src.states[0])
        for key in LOW_DIM_OBS_KEYS + IMAGE_OBS_KEYS:
            np.testing.assert_array_equal(ep.obs[key], src.obs[key])
    low = read_demo_file(path, load_images=False)
    assert not set(IMAGE_OBS_KEYS) & set(low.episodes[0].obs)


def test_official_style_file_without_rsd_attributes(tmp_path):
    """A file as LIBERO's own dataset script writes it (no rsd_* attrs, no init_state_index) reads fine."""
    task = _synthetic_task(tmp_path)
    path = write_demo_file(tmp_path / "x_demo.hdf5", task, [_synthetic_episode(5, 1)])
    with h5py.File(path, "r+") as f:
        for key in [k for k in f["data"].attrs if k.startswith("rsd_") or k == "task_id"]:
            del f["data"].attrs[key]
        del f["data/demo_0"].attrs["init_state_index"]
        del f["data/demo_0/robot_states"]
    demo = read_demo_file(path)
    assert demo.language == "x"  # OpenVLA's convention: the file name without _demo.hdf5
    assert demo.episodes[0].init_state_index is None and demo.episodes[0].robot_states is None


@pytest.mark.parametrize(
    "remove, expected",
    [
        ("data/demo_0/actions", "data/demo_0: missing 'actions'"),
        ("data/demo_0/obs/ee_pos", "data/demo_0/obs: missing 'ee_pos'"),
        ("attr:env_args", "missing attribute data.attrs['env_args']"),
        ("data", "missing top-level group 'data'"),
    ],
)
def test_missing_key_raises_clear_error(tmp_path, remove, expected):
    task = _synthetic_task(tmp_path)
    path = write_demo_file(tmp_path / "t_demo.hdf5", task, [_synthetic_episode(6, 0)])
    with h5py.File(path, "r+") as f:
        if remove.startswith("attr:"):
            del f["data"].attrs[remove[len("attr:"):]]
        else:
            del f[remove]
    with pytest.raises(DemoSchemaError) as err:
        validate_demo_file(path)
    message = str(err.value)
    assert expected in message, message
    assert "\n" not in message and ("collect" in message or "write_demo_file" in message)
    with pytest.raises(DemoSchemaError):
        read_demo_file(path)


def test_images_required_but_absent(tmp_path):
    task = _synthetic_task(tmp_path)
    path = write_demo_file(tmp_path / "t_demo.hdf5", task, [_synthetic_episode(6, 0)])
    with pytest.raises(DemoSchemaError, match="agentview_rgb.*images=true"):
        validate_demo_file(path, require_images=True)
    with pytest.raises(DemoSchemaError, match="'agentview_rgb' is missing"):  # the writer checks episodes too
        write_demo_file(tmp_path / "u_demo.hdf5", task, [_synthetic_episode(6, 0)], images=True)
    assert not (tmp_path / "u_demo.hdf5").exists() and not (tmp_path / "u_demo.hdf5.tmp").exists()


def test_truncated_file(tmp_path):
    path = tmp_path / "broken_demo.hdf5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(DemoSchemaError, match="not a readable HDF5 file"):
        validate_demo_file(path)


# ----------------------------------------------------------------------------------------------------
# (a), (c): the real simulator


@pytest.fixture(scope="module")
def sim_task0():
    from rsd.envs.libero_env import get_init_states, get_task, make_env

    task = get_task(SUITE, 0)
    env = make_env(task)
    yield task, env, get_init_states(SUITE, 0)
    env.close()


@pytest.fixture(scope="module")
def expert_rollout(sim_task0):
    from rsd.data.record import run_expert_episode

    task, env, init_states = sim_task0
    return run_expert_episode(env, task, init_states[0], init_state_index=0)


@pytest.mark.sim
def test_expert_episode_succeeds_and_writes_valid_file(sim_task0, expert_rollout, tmp_path):
    from rsd.envs.libero_env import MAX_STEPS

    task, env, _ = sim_task0
    roll = expert_rollout
    assert roll.error is None
    assert roll.success, roll.log
    T = roll.num_steps
    assert 0 < T <= MAX_STEPS[SUITE]
    assert roll.actions.shape == (T, 7) and np.all(np.abs(roll.actions) <= 1.0)
    assert set(np.unique(roll.actions[:, 6])) <= {-1.0, 1.0}
    assert roll.states.shape == (T, env.sim.get_state().flatten().shape[0])
    assert roll.dones[-1] == 1 and roll.dones[:-1].sum() == 0

    path = write_demo_file(demo_path(tmp_path, SUITE, task.name), task, [roll.to_episode()])
    validate_demo_file(path)
    demo = read_demo_file(path)
    assert demo.language == task.language
    ep = demo.episodes[0]
    assert ep.init_state_index == 0 and ep.num_samples == T
    assert ep.actions.shape == (T, 7) and ep.actions.dtype == np.float64
    assert ep.states.shape == roll.states.shape and ep.robot_states.shape == (T, 9)
    assert ep.rewards.shape == (T,) and ep.dones.shape == (T,)
    for key, dim in {"ee_pos": 3, "ee_ori": 3, "ee_states": 6, "gripper_states": 2, "joint_states": 7}.items():
        assert ep.obs[key].shape == (T, dim), key
    np.testing.assert_array_equal(ep.init_state, ep.states[0])
    np.testing.assert_allclose(ep.robot_states[:, 2:5], ep.obs["ee_pos"])


@pytest.mark.sim
def test_replay_reproduces_success(sim_task0, expert_rollout):
    """Replaying the recorded actions from the recorded init state (as the collection ran it: reset,
    set_init_state(init_states[i]), the 10 warm-up no-ops) reproduces the states and the success."""
    from rsd.envs.libero_env import NOOP_ACTION, NUM_WARMUP_STEPS

    task, env, init_states = sim_task0
    roll = expert_rollout
    env.reset()
    env.set_init_state(init_states[roll.init_state_index])
    for _ in range(NUM_WARMUP_STEPS):
        env.step(NOOP_ACTION)
    np.testing.assert_allclose(env.sim.get_state().flatten(), roll.init_state, atol=1e-6)
    done = False
    for t, action in enumerate(roll.actions):
        np.testing.assert_allclose(env.sim.get_state().flatten(), roll.states[t], atol=1e-4, err_msg=f"step {t}")
        _, _, done, _ = env.step(action)
        if done:
            break
    assert done and t == len(roll.actions) - 1


@pytest.mark.sim
def test_dart_demo_keeps_expert_labels_and_replays_with_executed_actions(tmp_path):
    """DART collection: the env executes noisy actions, the file keeps the expert's clean labels beside them,
    the executed actions replay the recorded states and the success; a clean request collects again."""
    from rsd.data import collect
    from rsd.envs.libero_env import get_task, make_env, reset_to_init_state

    out = tmp_path / "demos"
    summary = collect.collect_suite(SUITE, demos_per_task=1, tasks=[0], workers=0, out_dir=out, progress=False,
                                    action_noise=0.2)
    row = summary["tasks"][0]
    assert row["successes"] == 1, row
    demo = read_demo_file(out / SUITE / f"{row['name']}_demo.hdf5")
    assert float(demo.attrs["rsd_action_noise"]) == 0.2
    ep = demo.episodes[0]
    executed = np.asarray(ep.attrs["rsd_executed_actions"])
    assert executed.shape == ep.actions.shape
    arm_noise = executed[:, :6] - ep.actions[:, :6]
    # the noise is there (std 0.2 before clipping at +-1) and never touches the gripper
    assert 0.05 < float(np.std(arm_noise[:, :3])) < 0.3
    np.testing.assert_array_equal(executed[:, 6], ep.actions[:, 6])
    assert set(np.unique(ep.actions[:, 6])) <= {-1.0, 1.0}

    task = get_task(SUITE, 0)
    env = make_env(task)
    try:
        env.seed(int(ep.attrs["rsd_scene_seed"]))
        env.reset()
        reset_to_init_state(env, env.sim.get_state().flatten().copy(), reset=False)
        done = False
        for t, action in enumerate(executed):
            np.testing.assert_allclose(env.sim.get_state().flatten(), ep.states[t], atol=1e-4, err_msg=f"step {t}")
            _, _, done, _ = env.step(action)
            if done:
                break
        assert done and t == len(executed) - 1
    finally:
        env.close()
    # the same folder asked for clean demos: the noisy file does not satisfy the request
    again = collect.collect_suite(SUITE, demos_per_task=1, tasks=[0], workers=0, out_dir=out, progress=False)
    assert not again["tasks"][0]["skipped"]
    assert float(read_demo_file(out / SUITE / f"{row['name']}_demo.hdf5").attrs["rsd_action_noise"]) == 0.0
    with pytest.raises(ValueError, match="action_noise"):
        collect.collect_suite(SUITE, demos_per_task=1, tasks=[0], workers=0, out_dir=out, action_noise=-0.1)


@pytest.mark.sim
def test_collect_suite_small(tmp_path, monkeypatch):
    """collect_suite in-process for one init state: writes the file, the summary, and skips on rerun."""
    from rsd.data import collect

    out = tmp_path / "demos"
    summary = collect.collect_suite(SUITE, demos_per_task=1, tasks=[0], workers=0, out_dir=out, progress=False)
    row = summary["tasks"][0]
    assert row["attempts"] == 1 and row["successes"] == 1 and row["success_rate"] == 1.0
    path = out / SUITE / f"{row['name']}_demo.hdf5"
    assert read_demo_file(path).num_demos == 1
    assert (out / SUITE / "collect_summary.json").exists() and (out / SUITE / "collect_summary.md").exists()
    assert not (out / SUITE / ".parts").exists()

    def boom(*args, **kwargs):
        raise AssertionError("a complete task must not be collected again")

    monkeypatch.setattr(collect, "run_attempt", boom)
    again = collect.collect_suite(SUITE, demos_per_task=1, tasks=[0], workers=0, out_dir=out, progress=False)
    assert again["tasks"][0]["skipped"] and again["tasks"][0]["successes"] == 1
    shutil.rmtree(out)


def test_demos_wanted_per_task_counts():
    """``task_demos`` replaces the default count for the tasks it names and refuses unknown ids or counts < 1."""
    from rsd.data.collect import demos_wanted

    assert demos_wanted([0, 8, 9], 50, {8: 100}, 10) == {0: 50, 8: 100, 9: 50}
    assert demos_wanted([0], 50, {8: 100}, 10) == {0: 50}  # a task not collected is not asked for
    assert demos_wanted([0, 1], 3, None, 10) == {0: 3, 1: 3}
    with pytest.raises(ValueError, match="0..9"):
        demos_wanted([0], 50, {10: 5}, 10)
    with pytest.raises(ValueError, match=">= 1"):
        demos_wanted([0], 50, {0: 0}, 10)


@pytest.mark.sim
def test_collect_suite_task_demos_collects_more_for_one_task(tmp_path, monkeypatch):
    """``task_demos={0: 2}`` with ``demos_per_task=1``: task 0's file holds 2 demos and says 2 were requested; a
    rerun asking for the same is skipped."""
    from rsd.data import collect

    out = tmp_path / "demos"
    summary = collect.collect_suite(SUITE, demos_per_task=1, tasks=[0], workers=0, out_dir=out, progress=False,
                                    task_demos={0: 2})
    row = summary["tasks"][0]
    assert row["successes"] == 2
    demo = read_demo_file(out / SUITE / f"{row['name']}_demo.hdf5")
    assert demo.num_demos == 2 and int(demo.attrs["rsd_demos_requested"]) == 2
    calls = []
    real = collect.run_attempt

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(collect, "run_attempt", counting)
    again = collect.collect_suite(SUITE, demos_per_task=1, tasks=[0], workers=0, out_dir=out, progress=False,
                                  task_demos={0: 2})
    assert again["tasks"][0]["skipped"] and not calls


@pytest.mark.sim
def test_expert_libero_object_episode():
    """libero_object: the object goes into the basket (target: the simulator site basket_1_contain_region)."""
    from rsd.data.record import run_expert_episode
    from rsd.envs.expert import ObjectInBasketExpert, make_expert
    from rsd.envs.libero_env import get_init_states, get_task, make_env

    task = get_task("libero_object", 0)
    env = make_env(task)
    try:
        roll = run_expert_episode(env, task, get_init_states("libero_object", 0)[0], init_state_index=0)
        assert roll.success and roll.error is None, roll.log
        assert isinstance(make_expert(env, task), ObjectInBasketExpert)
    finally:
        env.close()
