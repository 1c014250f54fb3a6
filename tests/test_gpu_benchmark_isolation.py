"""scripts/benchmark_gpu_latency.py, vla_llm design: a failing cache mode costs its row, not the run (issue 21).

- ``run_child``: a child killed by a signal (SIGSEGV, as inductor's CUDA-graph path at 90feab5) or exiting
  with an error gives a row with the reason;
- end to end at ``--backbone-scale tiny`` on CPU (bfloat16): an isolated mode that segfaults and an in-process
  mode that raises are recorded with their reasons, the other mode runs, its strict check accepts exactly
  the forced a = 0..3 layers, and the JSON is complete.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark_gpu_latency.py"


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(SCRIPT), run_name="bench")


def test_run_child_records_a_signal_or_an_error(bench, tmp_path) -> None:
    out = tmp_path / "row.json"
    segv = bench["run_child"]([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"],
                              out, timeout=60)
    assert "ms" not in segv and "SIGSEGV" in segv["info"]["fallback"] and segv["child"]["returncode"] < 0
    err = bench["run_child"]([sys.executable, "-c", "raise SystemExit('no graphs here')"], out, timeout=60)
    assert "exited with code 1" in err["info"]["fallback"] and "no graphs here" in err["info"]["fallback"]
    ok = bench["run_child"]([sys.executable, "-c", f"open({str(out)!r}, 'w').write('{{\"ms\": 1, \"forced\": "
                             f"{{\"3\": 2}}}}')"], out, timeout=60)
    assert ok["ms"] == 1 and ok["forced"] == {3: 2} and ok["info"]["isolated"]


def _run(tmp_path, fault: str, accels: str, isolate: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / f"{fault.replace(':', '_')}.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--backbone", "openvla-shaped",
                          "--backbone-scale", "tiny", "--designs", "vla_llm", "--vla-accel", accels,
                          "--vla-isolate", isolate, "--dtypes", "bfloat16", "--iters", "2", "--warmup", "1",
                          "--backbone-iters", "2", "--backbone-warmup", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "RSD_BENCH_FAULT": fault})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res, json.loads(out.read_text())


def _check_ran(row: dict) -> None:
    assert row["info"]["fallback"] is None and "ms" in row
    chk = row["strict_check"]
    assert [chk[str(a)]["accepted"] for a in range(4)] == [0, 1, 2, 3]
    assert all(chk[str(a)]["accepted_as_forced"] for a in range(4))
    for a in range(4):
        f = row["forced"][str(a)]
        assert f["parts_ms"] > 0 and f["tokens_ms"] > 0 and f["llm_steps_after_verify"] == (4 if a == 3 else 7 - a)


def test_a_segfaulting_isolated_mode_and_a_raising_mode_cost_one_row_each(tmp_path) -> None:
    res, data = _run(tmp_path, "static:segv", "static,eager", "static")
    rows = data["vla_llm"]["bfloat16"]["rows"]
    assert "SIGSEGV" in rows["static"]["info"]["fallback"] and rows["static"]["info"]["isolated"]
    _check_ran(rows["eager"])
    assert "failed: child process killed by signal SIGSEGV" in res.stdout
    res, data = _run(tmp_path, "eager:raise", "eager,static", "none")
    rows = data["vla_llm"]["bfloat16"]["rows"]
    assert "fault injected" in rows["eager"]["info"]["fallback"] and "ms" not in rows["eager"]
    _check_ran(rows["static"])  # the static cache, in this process, with transformers' own version
