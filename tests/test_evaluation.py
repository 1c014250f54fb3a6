"""LIBERO evaluation harness: protocol rollouts, workers, JSONL resume, error capture, summary.

The simulator tests use short ``max_steps`` and trivial policies defined here (workers import this
module by name: pytest puts ``tests/`` on ``sys.path`` and spawned workers inherit it; the evaluate.py
subprocesses get it through ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from factories import tiny_engine_artifacts

from rsd import PROJECT_ROOT
from rsd.eval.rollout import accumulate_stats, binarize_gripper, check_chunk
from rsd.eval.runner import EPISODES_FILE, load_records, record_key, run_evaluation
from rsd.eval.summary import format_guide_summary, summarize, task_table_markdown, write_summary
from rsd.policies import NoopPolicy, build_policy

TESTS_DIR = Path(__file__).resolve().parent
SUITE = "libero_spatial"




# --------------------------------------------------------------------------------------------------
# Pure helpers (no simulator)


def test_gripper_binarized_and_chunks_checked():
    out = binarize_gripper(np.array([[0.1, 0, 0, 0, 0, 0, 0.3], [0, 0, 0, 0, 0, 0, -0.2], [0] * 7]))
    assert out[:, -1].tolist() == [1.0, -1.0, -1.0]
    assert out[0, 0] == 0.1
    assert check_chunk(np.zeros(7)).shape == (1, 7)
    with pytest.raises(ValueError):
        check_chunk(np.zeros((8, 6)))
    with pytest.raises(ValueError):
        check_chunk(np.full((8, 7), np.nan))
    total: dict = {}
    accumulate_stats(total, {"draft_ms": 1.0, "accepted_per_layer": [1, 0, 0], "accepted_layers": 1})
    accumulate_stats(total, {"draft_ms": 2.0, "accepted_per_layer": [1, 1, 0], "accepted_layers": 2})
    assert total == {"draft_ms": 3.0, "accepted_per_layer": [2.0, 1.0, 0.0], "accepted_layers": 3.0}
    assert isinstance(build_policy({"factory": "noop"}), NoopPolicy)


def _rec(task, trial, mode, success, times, error=None, **engine):
    return {"suite": SUITE, "task_id": task, "trial": trial, "init_index": trial, "mode": mode,
            "success": success, "steps": 100 if success else 220, "wall_time_s": 5.0,
            "inference_times_ms": times, "num_inferences": len(times), "engine_stats": engine,
            "error": error, "task_name": f"task_{task}", "instruction": f"do task {task}", "video": None}


def test_summary_numbers_from_fixture_jsonl(tmp_path):
    recs = [
        # speculative: 3 episodes, 2 successes, times 10, 20, 30, 40 ms; 6 of 12 drafted layers accepted
        _rec(0, 0, "speculative", True, [10.0, 20.0], draft_ms=2.0, main_ms=10.0, drafted_layers=6,
             accepted_layers=4, main_steps=12),
        _rec(0, 1, "speculative", False, [30.0], draft_ms=1.0, main_ms=5.0, drafted_layers=3,
             accepted_layers=0, main_steps=8),
        _rec(1, 0, "speculative", True, [40.0], draft_ms=1.0, main_ms=5.0, drafted_layers=3,
             accepted_layers=2, main_steps=6),
        # baseline: 1 success of 3, one error; times 50 ms each
        _rec(0, 0, "baseline", True, [50.0, 50.0], main_ms=80.0, main_steps=16),
        _rec(0, 1, "baseline", False, [50.0], error="RuntimeError: boom", main_ms=40.0, main_steps=8),
        _rec(1, 0, "baseline", False, [50.0], main_ms=40.0, main_steps=8),
    ]
    path = tmp_path / EPISODES_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"suite": "libero_spatial", "task_')
    loaded = load_records(tmp_path)  # the truncated last line is dropped
    assert len(loaded) == 6
    s = summarize(loaded, suite=SUITE)
    spec, base = s["modes"]["speculative"], s["modes"]["baseline"]
    assert (spec["episodes"], spec["successes"], spec["errors"]) == (3, 2, 0)
    assert spec["success_rate"] == pytest.approx(2 / 3)
    assert spec["avg_inference_ms"] == pytest.approx(25.0)
    assert spec["engine"]["inferences"] == 4
    assert spec["engine"]["avg_draft_ms"] == pytest.approx(1.0)
    assert spec["engine"]["avg_main_ms"] == pytest.approx(5.0)
    assert spec["engine"]["acceptance_rate"] == pytest.approx(0.5)
    assert spec["engine"]["mean_accepted_layers"] == pytest.approx(1.5)
    assert spec["engine"]["main_steps_per_inference"] == pytest.approx(6.5)
    assert spec["avg_steps_success"] == pytest.approx(100)
    assert (base["successes"], base["errors"]) == (1, 1)
    assert base["success_rate"] == pytest.approx(1 / 3)
    assert base["success_rate_no_errors"] == pytest.approx(1 / 2)
    cmp_ = s["comparison"]
    assert cmp_["paired_episodes"] == 3
    assert cmp_["speedup"] == pytest.approx(50.0 / 25.0)
    assert cmp_["speedup_main"] == pytest.approx((160 / 4) / (20 / 4))
    assert cmp_["success_rate_diff"] == pytest.approx(1 / 3)
    assert (cmp_["both_success"], cmp_["only_speculative"], cmp_["only_baseline"], cmp_["neither"]) == (1, 1, 0, 1)
    tasks = {row["task_id"]: row for row in s["per_task"]}
    assert tasks[0]["modes"]["speculative"]["successes"] == 1
    assert tasks[1]["modes"]["speculative"]["success_rate"] == 1.0
    assert s["num_errors"] == 1
    text = format_guide_summary(s)
    for line in ("Task Suite: libero_spatial", "Total Episodes: 3", "Total Successes: 2", "Success Rate: 66.7%",
                 "Avg Inference Time: 25.0 ms", "Speculative Decoding: True", "Speculative Decoding: False",
                 "Total Inferences: 4", "Avg Draft Time: 1.0 ms", "Avg Main Time: 5.0 ms",
                 "Acceptance Rate: 50.0%", "Speedup (baseline / speculative inference time): 2.00x"):
        assert line in text, line
    md = task_table_markdown(s)
    # cells carry the 95 % Wilson interval in percent (1/2: 9.5-90.5, 2/3: 20.8-93.9, 1/3: 6.1-79.2)
    assert "| 0 | do task 0 | 1/2 (50%) [9, 91] | 1/2 (50%) [9, 91], 1 err |" in md
    assert "| all |  | 2/3 (67%) [21, 94] | 1/3 (33%) [6, 79], 1 err |" in md
    paths = write_summary(tmp_path, s)
    assert json.loads(paths["json"].read_text())["modes"]["speculative"]["successes"] == 2


# --------------------------------------------------------------------------------------------------
# Simulator


def _keys(records):
    return [record_key(r) for r in records]


def _evaluate_cmd(out_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(PROJECT_ROOT / "evaluate.py"), f"out_dir={out_dir}", f"suite={SUITE}",
            "tasks=[0]", "trials=2", "workers=2", "max_steps=8", "progress=false",
            "policy.factory=harness_policies:make_faulty_policy", *overrides]


@pytest.mark.sim
def test_interrupted_evaluation_resumes_without_losing_or_repeating(tmp_path):
    out = tmp_path / "out"
    flag = tmp_path / "interrupted.flag"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
               WANDB_SILENT="true")
    env.pop("WANDB_MODE", None)
    policy = ["+policy.interrupt_on=[1]", f"+policy.interrupt_flag={flag}",
              f"+policy.wait_for={out / EPISODES_FILE}"]
    # 1) trial 1's policy presses Ctrl-C once trial 0 (the other worker) is recorded
    first = subprocess.run(_evaluate_cmd(out, *policy, "wandb=false"), env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=240)
    assert first.returncode == 130, first.stderr[-3000:]
    assert flag.exists()
    before = load_records(out)
    assert _keys(before) == [(SUITE, 0, 0, "speculative")]
    with open(out / EPISODES_FILE, "a") as f:  # and a write cut off by the kill
        f.write('{"suite": "libero_spatial", "task_id": 0, "trial": 1, "mo')
    # 2) the same command resumes: only trial 1 runs (with a video), then summary, tables, W&B
    second = subprocess.run(_evaluate_cmd(out, *policy, "video=all", "wandb_mode=offline"), env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    lines = (out / EPISODES_FILE).read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert sorted(_keys(recs)) == [(SUITE, 0, 0, "speculative"), (SUITE, 0, 1, "speculative")]
    assert recs[0] == before[0]  # kept, not rerun
    new = recs[1]
    assert new["error"] is None and new["success"] is False and new["steps"] == 8
    assert new["num_inferences"] == 1 and len(new["inference_times_ms"]) == 1
    assert new["video"] and (out / new["video"]).stat().st_size > 0
    assert new["task_name"] and new["instruction"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["resumed_episodes"] == 1 and summary["new_episodes"] == 1
    assert summary["modes"]["speculative"]["episodes"] == 2
    assert (out / "tasks.md").read_text().count("0/2 (0%)") == 2
    assert "Total Episodes: 2" in (out / "summary.txt").read_text()
    assert list((out / "wandb").glob("offline-run-*"))
    assert "Success Rate: 0.0%" in second.stdout


@pytest.mark.sim
def test_failing_episodes_are_recorded_and_the_rest_go_on(tmp_path):
    spec = {"factory": "harness_policies:make_faulty_policy", "raise_on": [0], "exit_on": [1]}
    run = run_evaluation(SUITE, spec, tmp_path, tasks=[0], trials=3, workers=1, max_steps=8, progress=False)
    assert run.total == 3 and run.new == 3
    assert _keys(run.records) == [(SUITE, 0, t, "speculative") for t in range(3)]
    raised, died, ok = run.records
    assert raised["success"] is False and raised["error"] == "RuntimeError: policy failure on trial 0"
    assert "policy failure" in raised["traceback"]
    assert died["success"] is False and died["error"].startswith("WorkerDied") and "code 3" in died["error"]
    assert ok["error"] is None and ok["steps"] == 8 and ok["num_inferences"] == 1
    assert ok["worker"] != raised["worker"]  # a new worker replaced the dead one
    assert len(load_records(tmp_path)) == 3
    # resume: nothing left to do
    again = run_evaluation(SUITE, spec, tmp_path, tasks=[0], trials=3, workers=0, max_steps=8, progress=False,
                           retry_errors=False)
    assert again.new == 0 and again.skipped == 3


@pytest.mark.sim
def test_expert_policy_success_is_counted(tmp_path):
    pytest.importorskip("rsd.envs.expert")
    run = run_evaluation(SUITE, {"factory": "expert"}, tmp_path, tasks=[0], trials=[0], workers=0,
                         progress=False)
    (rec,) = run.records
    assert rec["error"] is None, rec["traceback"]
    assert rec["success"] is True and 50 < rec["steps"] < 220
    assert rec["num_inferences"] == rec["steps"]  # chunk_len 1: closed loop
    m = rec["markers"]  # the bowl was lifted and put down on the plate; the gripper closed on it
    assert m["object"] == "akita_black_bowl_1" and m["target"] == "plate_1"
    assert m["lift_max_cm"] > 3 and m["end_dist_cm"] < 5 and m["gripper_closes"] >= 1


@pytest.mark.sim
def test_generated_scenes_are_a_selection_set_apart_from_the_official_states(tmp_path, monkeypatch):
    """init_source=generated: scene i of task t is drawn by env.seed(scene_seed + 1000 t + i) in a fresh env,
    stored in init_states.npz (workers and resumes read it), none is an official state; the records carry
    goal markers, which the failure table reads."""
    from rsd.analysis.failures import failure_table
    from rsd.data.heldout import SAME_SCENE_TOL, nearest_scene
    from rsd.envs.libero_env import generate_scenes, get_init_states, get_task
    from rsd.eval.runner import SCENES_FILE

    kw = dict(tasks=[1], trials=2, max_steps=4, progress=False, init_source="generated", scene_seed=900_000,
              scenes_dir=tmp_path / "shared")
    run = run_evaluation(SUITE, {"factory": "noop"}, tmp_path, workers=1, **kw)
    assert [r["error"] for r in run.records] == [None, None]
    with np.load(tmp_path / SCENES_FILE) as f:
        scenes = f["task_1"]
    assert scenes.shape[0] == 2 and not np.allclose(scenes[0], scenes[1])
    assert np.array_equal(scenes, generate_scenes(get_task(SUITE, 1), 2, 900_000))  # the same seeds, same scenes
    official = get_init_states(SUITE, 1)
    assert all(nearest_scene(sc, official)[1] > SAME_SCENE_TOL for sc in scenes)
    table = failure_table(run.records)
    assert table["total"] == {"episodes": 2, "never closed": 2}  # the no-op policy never closes the gripper
    import rsd.eval.start_states as start_states

    def no_drawing(*args, **kwargs):
        raise AssertionError("scenes drawn again")

    monkeypatch.setattr(start_states, "generate_scenes", no_drawing)  # a second evaluation copies the shared scenes
    again = run_evaluation(SUITE, {"factory": "noop"}, tmp_path / "again", workers=0, **{**kw, "trials": 1})
    with np.load(tmp_path / "again" / SCENES_FILE) as f:
        assert np.array_equal(f["task_1"], scenes[:1]) and len(again.records) == 1
    with pytest.raises(ValueError, match="different evaluation"):  # other scenes are another evaluation
        run_evaluation(SUITE, {"factory": "noop"}, tmp_path, workers=0, **{**kw, "scene_seed": 800_000})
    with pytest.raises(ValueError, match="init_source"):
        run_evaluation(SUITE, {"factory": "noop"}, tmp_path / "x", workers=0, **{**kw, "init_source": "random"})


@pytest.mark.sim
def test_engine_policy_both_modes_on_the_same_init_states(tmp_path):
    from rsd.policies import resolve_policy_spec

    art = tiny_engine_artifacts(tmp_path)
    spec = resolve_policy_spec({"factory": "engine", "suite": SUITE, "ckpt": "best", "log_dir": art["log_dir"],
                                "tokenizer": art["tokenizer"], "main_ckpt": None, "backbone": None,
                                "device": "auto", "acceptance": "strict", "delta": 1, "tau": None,
                                "chunk_len": 8})
    assert spec["ckpt"] == art["draft"] and spec["main_ckpt"] == art["main"]  # the draft's lineage names it
    run = run_evaluation(SUITE, spec, tmp_path / "out", tasks=[0], trials=[0], mode="both", workers=0,
                         max_steps=24, progress=False)
    spec_rec, base_rec = run.records
    assert (spec_rec["mode"], base_rec["mode"]) == ("speculative", "baseline")
    for rec in run.records:
        assert rec["error"] is None, rec["traceback"]
        assert rec["num_inferences"] == 3 and rec["steps"] == 24
    n = spec_rec["num_inferences"]
    eng = spec_rec["engine_stats"]
    assert eng["drafted_layers"] == 3 * n and 0 <= eng["accepted_layers"] <= 3 * n
    assert eng["main_steps"] == 8 * n - eng["accepted_layers"]
    assert base_rec["engine_stats"]["main_steps"] == 8 * n and "drafted_layers" not in base_rec["engine_stats"]
    # strict speculative decoding is lossless: the same actions were executed from the same init state
    assert spec_rec["action_digest"] == base_rec["action_digest"]
    s = summarize(run.records, suite=SUITE)
    assert s["comparison"]["identical_actions"] == 1 and s["comparison"]["speedup"] > 0
    assert s["modes"]["speculative"]["engine"]["acceptance_rate"] is not None


# --------------------------------------------------------------------------------------------------
# Resume rules: another policy is refused, retry_errors reruns errored episodes, max_episodes




def _evaluate_in_process(out_dir: Path, *overrides: str) -> dict:
    from hydra import compose, initialize_config_dir

    import rsd.evaluate as entry

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"suite={SUITE}", "tasks=[0]", "trials=2", "workers=0",
                                                     "max_steps=8", "progress=false", "wandb=false",
                                                     f"out_dir={out_dir}", *overrides])
    return entry.evaluate(cfg)


@pytest.mark.sim
def test_evaluate_refuses_to_resume_a_folder_of_another_policy(tmp_path):
    out = tmp_path / "out"
    first = _evaluate_in_process(out, "policy.factory=noop", "policy.chunk_len=8")
    assert first["complete"] and first["new_episodes"] == 2
    before = (out / EPISODES_FILE).read_text()
    with pytest.raises(ValueError, match="different evaluation"):  # another chunk length = another policy
        _evaluate_in_process(out, "policy.factory=noop", "policy.chunk_len=4")
    assert (out / EPISODES_FILE).read_text() == before  # nothing appended
    again = _evaluate_in_process(out, "policy.factory=noop", "policy.chunk_len=8")  # the same policy resumes
    assert again["resumed_episodes"] == 2 and again["new_episodes"] == 0
    forced = _evaluate_in_process(out, "policy.factory=noop", "policy.chunk_len=4", "resume_check=false")
    assert forced["resumed_episodes"] == 2  # resume_check=false appends anyway


@pytest.mark.sim
def test_retry_errors_and_max_episodes(tmp_path):
    flag = tmp_path / "failing.flag"
    flag.write_text("x")
    spec = {"factory": "harness_policies:make_flaky_policy", "raise_on": [0], "flag": str(flag)}
    out = tmp_path / "out"
    # max_episodes: only that many new episodes now, the rest on the next resume
    part = run_evaluation(SUITE, spec, out, tasks=[0], trials=3, workers=0, max_steps=8, progress=False,
                          max_episodes=2)
    assert (part.total, part.new, part.skipped, len(part.records)) == (3, 2, 0, 2)
    assert part.records[0]["error"] == "RuntimeError: flaky failure on trial 0"
    rest = run_evaluation(SUITE, spec, out, tasks=[0], trials=3, workers=0, max_steps=8, progress=False)
    assert (rest.new, rest.skipped) == (1, 2) and [r["trial"] for r in rest.records] == [0, 1, 2]
    flag.unlink()  # the failure cause is gone
    # without retry_errors the errored episode is kept; with it, it runs again and replaces the old record
    kept = run_evaluation(SUITE, spec, out, tasks=[0], trials=3, workers=0, max_steps=8, progress=False)
    assert kept.new == 0 and kept.records[0]["error"] is not None
    retried = run_evaluation(SUITE, spec, out, tasks=[0], trials=3, workers=0, max_steps=8, progress=False,
                             retry_errors=True)
    assert (retried.new, retried.skipped) == (1, 2)
    assert retried.records[0]["trial"] == 0 and retried.records[0]["error"] is None
    stored = load_records(out)
    assert sorted(r["trial"] for r in stored) == [0, 1, 2] and not any(r["error"] for r in stored)
