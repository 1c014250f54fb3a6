"""rsd.engine.accelerate: eager default unchanged, compile == eager tokens (or a clear fallback), cuda_graph
falls back on CPU, fallbacks at the first call, and the GPU latency benchmark's CPU smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from margins import LOGIT_MARGIN, teacher_forced_gap, top2_gap

from rsd.engine import RSDInferenceEngine
from rsd.engine.accelerate import ACCELERATE_MODES, AcceleratedDraft, _Fallback, accelerate_models
from rsd.models.draft import RFSQDraftModelWithProjection
from rsd.models.main_decoder import RFSQMainDecoder

ROOT = Path(__file__).resolve().parents[1]
D_IN = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _models(seed: int = 0):
    torch.manual_seed(seed)
    main = RFSQMainDecoder(input_dim=D_IN, d_model=64, num_blocks=2, num_heads=4, ff_dim=128).eval()
    draft = RFSQDraftModelWithProjection(input_dim=D_IN, hidden_dim=64, num_heads=4, feedforward_dim=128).eval()
    return main, draft


class _OracleDraft:
    """Proposes the main model's own greedy layers 0..2 (full acceptance): ``tokens[i]`` at the i-th call.

    A test double: it replaces an engine's (accelerated) draft after construction, it is never compiled.
    """

    num_coarse_layers = 3

    def __init__(self, tokens: list[torch.Tensor]) -> None:
        self.tokens = [t[:, :3] for t in tokens]
        self.calls = 0

    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.tokens[self.calls - 1]


def _hidden(n: int = 4) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(3))


def _decode_all(engine: RSDInferenceEngine, hidden: torch.Tensor) -> list[torch.Tensor]:
    return [engine.predict(hidden[i:i + 1], decode=False).tokens for i in range(hidden.shape[0])]


def test_eager_is_the_default_and_changes_nothing():
    main, draft = _models()
    eng = RSDInferenceEngine(main, draft, mode="strict")
    assert eng.main is main and eng.draft is draft
    assert eng.accelerate_info == {"requested": "eager", "mode": "eager", "draft": "eager", "main": "eager",
                                   "fallback": None}
    d, m, info = accelerate_models(draft, main, "eager")
    assert d is draft and m is main and info["mode"] == "eager"
    assert RSDInferenceEngine(main, mode="baseline").accelerate_info["draft"] == "none"
    assert ACCELERATE_MODES == ("eager", "compile", "cuda_graph")


def test_unknown_mode_raises():
    main, draft = _models()
    with pytest.raises(ValueError, match="accelerate must be one of"):
        accelerate_models(draft, main, "tensorrt")
    with pytest.raises(ValueError, match="accelerate must be one of"):
        RSDInferenceEngine(main, draft, mode="strict", accelerate="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_cuda_graph_on_cpu_falls_back_with_a_warning():
    main, draft = _models()
    with pytest.warns(RuntimeWarning, match="CUDA") as rec:
        eng = RSDInferenceEngine(main, draft, mode="strict", accelerate="cuda_graph")
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    info = eng.accelerate_info
    assert info["requested"] == "cuda_graph" and info["mode"] == "eager" and "CUDA" in info["fallback"]
    assert eng.main is main and eng.draft is draft
    h = _hidden(2)
    base = RSDInferenceEngine(main, mode="baseline")
    ref = _decode_all(base, h)
    assert all(torch.equal(a, b) for i, (a, b) in enumerate(zip(_decode_all(eng, h), ref, strict=True))
               if float(teacher_forced_gap(main, h[i:i + 1], b)[0]) > LOGIT_MARGIN)  # see margins.py


def test_policy_accelerate_reaches_the_engines():
    from rsd.policies import spec_identity
    from rsd.policies.engine_policy import EnginePolicy

    main, draft = _models()
    assert EnginePolicy(object(), draft, main, None).engine_for("speculative").accelerate_info["mode"] == "eager"
    with pytest.warns(RuntimeWarning, match="CUDA") if not torch.cuda.is_available() else warnings.catch_warnings():
        pol = EnginePolicy(object(), draft, main, None, accelerate="cuda_graph")
        eng = pol.engine_for("speculative")
    assert eng.accelerate_info["requested"] == "cuda_graph"
    assert pol.info["accelerate_speculative"] is eng.accelerate_info
    # like device, the option changes timings only: a resumed evaluation may switch it
    assert spec_identity({"ckpt": "x", "device": "cpu", "accelerate": "compile"}) == {"ckpt": "x"}


def _draft_near_ties(draft, h: torch.Tensor) -> int:
    """How many of the draft's 384 greedy tokens for ``h`` are near-ties (may flip between compiled and eager)."""
    with torch.no_grad():
        return int((top2_gap(draft(h)) <= LOGIT_MARGIN).sum())


def _strict_equals_baseline_and_eager(engine_kwargs: dict, accelerated=None):
    """Strict (random draft and oracle draft) and baseline engines, accelerated vs eager: equal tokens.

    Random weights: the compared paths (verification call vs single steps, compiled vs eager kernels) round
    differently, so tokens are compared on the samples whose greedy choices are not near-ties (margins.py).
    """
    main, draft = _models()
    h = _hidden(4)
    base = RSDInferenceEngine(main, mode="baseline")
    ref = _decode_all(base, h)
    sure = [float(teacher_forced_gap(main, h[i:i + 1], r)[0]) > LOGIT_MARGIN for i, r in enumerate(ref)]
    assert sum(sure) >= 2, sure  # 3 of 4 on the CPU this was written on

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y, s in zip(a, b, sure, strict=True) if s)

    eager_strict = _decode_all(RSDInferenceEngine(main, draft, mode="strict"), h)
    if accelerated is None:
        acc_strict = RSDInferenceEngine(main, draft, mode="strict", **engine_kwargs)
        acc_base = RSDInferenceEngine(main, mode="baseline", **engine_kwargs)
        oracle = RSDInferenceEngine(main, draft, mode="strict", **engine_kwargs)
        infos = [e.accelerate_info for e in (acc_strict, acc_base, oracle)]
    else:  # already accelerated objects, given to plain engines
        d, m, info = accelerated(draft, main)
        infos = [info]
        acc_strict = RSDInferenceEngine(m, d, mode="strict")
        acc_base = RSDInferenceEngine(m, mode="baseline")
        oracle = RSDInferenceEngine(m, d, mode="strict")
    oracle.draft = _OracleDraft(ref)  # the accelerated main decoder verifies a fully right proposal
    got = _decode_all(acc_strict, h)
    assert same(got, ref) and same(got, eager_strict)
    assert same(_decode_all(acc_base, h), ref)
    outs = [oracle.predict(h[i:i + 1], decode=False) for i in range(4)]
    assert all(o.accepted_length == 3 and torch.equal(o.tokens, r)
               for o, r, s in zip(outs, ref, sure, strict=True) if s)
    # the draft's tokens themselves: equal except at its own near-ties
    d = acc_strict.draft
    for i in range(4):
        differ = int((d.propose(h[i:i + 1]) != draft.propose(h[i:i + 1])).sum())
        assert differ <= _draft_near_ties(draft, h[i:i + 1]), (i, differ)
    return infos


def test_compile_tracing_gives_eager_tokens():
    """dynamo + AOT tracing of the draft and of the main decoder's KV-cache steps, without inductor's
    code generation (fast): the strict engine's tokens equal the baseline's and the eager engine's."""
    (info,) = _strict_equals_baseline_and_eager(
        {}, lambda d, m: accelerate_models(d, m, "compile", compile_options={"backend": "aot_eager"}))
    assert info["mode"] == "compile" and info["fallback"] is None, info
    assert info["draft"] == info["main"] == "compile(backend=aot_eager)"
    # the engine's own first-call check (compiled vs eager draft on h[0:1]): no flips beyond near-ties
    main, draft = _models()
    assert int(info["draft_check"].split(" of 384 tokens differ")[0]) <= _draft_near_ties(draft, _hidden(4)[:1])


@pytest.mark.slow
def test_compile_on_this_machine_gives_eager_tokens_or_falls_back():
    """The real ``accelerate="compile"`` (inductor; C++ on CPU): equal tokens, or one clear fallback."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        infos = _strict_equals_baseline_and_eager({"accelerate": "compile"})
    ours = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning) and "accelerate=" in str(w.message)]
    fell_back = [i for i in infos if i["fallback"] is not None]
    assert len(ours) == len(fell_back)  # one warning per engine that fell back, none otherwise
    for info in infos:
        if info["fallback"] is None:
            assert info["mode"] == "compile" and info["main"].startswith("compile"), info
            _, draft = _models()  # float32: equal tokens up to the draft's near-ties
            assert int(info.get("draft_check", "0 of").split(" of")[0]) <= _draft_near_ties(draft, _hidden(4)[:1])
        else:  # no compiler, ...: eager, with the reason
            assert info["mode"] == "eager" and any(info["fallback"] in m for m in ours), (info, ours)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler here (simulated)")


def test_failure_at_the_first_call_falls_back_once_with_the_reason():
    main, draft = _models()
    h = _hidden(2)
    ref = _decode_all(RSDInferenceEngine(main, mode="baseline"), h)
    d, m, info = accelerate_models(draft, main, "compile", compile_options={"backend": _failing_backend})
    assert info["mode"] == "compile"  # nothing has run yet
    eng = RSDInferenceEngine(m, d, mode="strict")
    with pytest.warns(RuntimeWarning, match="simulated") as rec:
        got = _decode_all(eng, h)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert all(torch.equal(a, b) for i, (a, b) in enumerate(zip(got, ref, strict=True))
               if float(teacher_forced_gap(main, h[i:i + 1], b)[0]) > LOGIT_MARGIN)  # see margins.py
    assert info["mode"] == "eager" and info["draft"] == info["main"] == "eager"
    assert "the draft failed" in info["fallback"] and "simulated" in info["fallback"]


def test_a_draft_that_disagrees_with_eager_is_dropped():
    main, draft = _models()
    info = {"requested": "compile", "mode": "compile", "draft": "compile", "main": "eager", "fallback": None}
    wrong = AcceleratedDraft(draft, lambda h: (draft.propose(h) + 1) % 7, _Fallback(info))
    h = _hidden(1)
    with pytest.warns(RuntimeWarning, match="differ"):
        out = wrong.propose(h)
    assert torch.equal(out, draft.propose(h)) and info["mode"] == "eager"
    assert info["draft_check"].startswith("384 of 384 tokens differ")
    assert torch.equal(wrong.propose(h), draft.propose(h))  # eager from now on
    assert wrong.num_coarse_layers == 3  # other attributes come from the draft


def test_gpu_latency_benchmark_cpu_smoke(tmp_path):
    """The GPU benchmark script runs on CPU (tiny models, 2 iterations) and imports no heavy packages."""
    out = tmp_path / "lat.json"
    script = ROOT / "scripts" / "benchmark_gpu_latency.py"
    argv = [str(script), "--device", "cpu", "--iters", "2", "--warmup", "1", "--tiny", "--hidden-dim", "32",
            "--dtypes", "float32", "--out", str(out)]
    code = (f"import runpy, sys; sys.argv = {argv!r}\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('hydra', 'omegaconf', 'wandb', 'libero', 'lightning', 'robosuite', 'transformers', 'h5py'))\n"
            "print('HEAVY', heavy)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "HEAVY []" in res.stdout, res.stdout[-2000:]
    data = json.loads(out.read_text())
    rows = {r["accelerate"]: r for r in data["rows"]}
    assert set(rows) == {"eager", "cuda_graph"}  # the CPU default
    for r in rows.values():
        assert r["tokens_equal_eager"] and r["accepted_a3"] == 3
        assert set(r["ms"]) == {"draft", "verify", "step", "baseline", "strict_a3", "strict_a0"}
        # per timed section: a distribution of real timings (p10 <= median <= p90, all positive)
        assert all(0 < v["p10"] <= v["median"] <= v["p90"] for v in r["ms"].values()), r["ms"]
    # random tiny models: the 4-position verification and the single steps may round a near-tie apart (~1e-6)
    # on some CPUs; a lossless engine differs at most in such isolated tokens, a broken one in hundreds
    eq = rows["eager"]["strict_equals_baseline"]
    assert eq["a3_tokens_differing"] <= 2 and eq["a0_tokens_differing"] <= 2, eq
    if not torch.cuda.is_available():
        assert rows["cuda_graph"]["info"]["mode"] == "eager" and "CUDA" in rows["cuda_graph"]["info"]["fallback"]


def test_make_env_openvla_runs_the_documented_commands():
    """``make env-openvla`` and the command list in docs/backbones.md are the same (not run: needs network)."""
    import re
    import shutil

    if shutil.which("make") is None:
        pytest.skip("no make")
    doc = (ROOT / "docs" / "backbones.md").read_text()
    section = doc[doc.index("### 2. The openvla environment"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)

    def commands(text: str) -> list[str]:
        text = text.replace("\\\n", " ")
        return [" ".join(line.split("    #")[0].split()) for line in text.splitlines() if line.strip()]

    env = {k: v for k, v in os.environ.items() if k not in ("OPENVLA_PYTHON", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    res = subprocess.run(["make", "-n", "--no-print-directory", "env-openvla"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert commands(res.stdout) == commands(block)


def test_gpu_latency_benchmark_openvla_shaped_backbone_tiny_cpu(tmp_path):
    """``--backbone openvla-shaped --backbone-scale tiny`` on CPU: every field of the per-chunk / per-action
    report is there, positive and consistent (per action = chunk total / 8, ratios, percentages); full scale is
    refused on CPU."""
    import math
    import runpy

    script = ROOT / "scripts" / "benchmark_gpu_latency.py"
    bench = runpy.run_path(str(script), run_name="bench")
    with pytest.raises(SystemExit, match="CUDA only"):
        bench["main"](["--device", "cpu", "--backbone", "openvla-shaped", "--backbone-scale", "full"])
    # the timed paths compute what they claim: the feature is hidden_states[-1][:, -1] of the full forward, and
    # the KV-cached autoregressive action equals greedy decoding recomputed from scratch
    backbone, obs = bench["build_backbone"]("tiny", torch.float32, torch.device("cpu"), 20, 0)
    with torch.inference_mode():
        embeds = backbone.embeddings(obs)
        full = backbone.llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][:, -1]
        assert embeds.shape[1] == 276 and torch.allclose(backbone(obs), full, atol=1e-5)
        seq, ref = embeds, []
        for _ in range(7):
            ref.append(backbone.llm(inputs_embeds=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True))
            seq = torch.cat([seq, backbone.llm.get_input_embeddings()(ref[-1])], dim=1)
        assert torch.equal(backbone.generate_action(obs), torch.cat(ref, dim=1))

    out = tmp_path / "openvla_shaped.json"
    res = subprocess.run([sys.executable, str(script), "--device", "cpu", "--backbone", "openvla-shaped",
                          "--backbone-scale", "tiny", "--accel", "eager", "--iters", "2", "--warmup", "1",
                          "--backbone-iters", "2", "--backbone-warmup", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "AR / RSD per action" in res.stdout and "targets" in res.stdout
    data = json.loads(out.read_text())
    assert data["machine"]["name"] and data["machine"]["name"] in res.stdout and data["machine"]["transformers"]
    bb = data["backbone"]
    assert bb["scale"] == "tiny" and bb["tokens"] == 20 + 256 and data["chunk_len"] == 8
    sizes = bb["sizes"]
    assert data["hidden_dim"] == sizes["llm"]["hidden_size"] == 64 and sizes["image"]["patches_per_tower"] == 256
    assert sizes["projector"][0] == sizes["dino"]["hidden_size"] + sizes["siglip"]["hidden_size"]
    br = bb["results"]["float32"]
    assert set(br["ms"]) == set(bench["BACKBONE_OPS"])
    assert all(0 < v["p10"] <= v["median"] <= v["p90"] for v in br["ms"].values()), br["ms"]
    assert br["ar_action_tokens"] == 7 and br["hidden_finite"]
    (row,) = data["rows"]
    assert row["chunk_accepted"]["strict_a3"] == 3
    modes = row["chunk_summary"]["modes"]
    assert set(modes) == {"baseline", "strict_a3", "strict_a0"}
    ar = br["ms"]["ar_action"]["median"]
    for name, m in modes.items():
        assert set(m) == {"backbone_ms", "draft_ms", "main_ms", "decode_ms", "chunk_ms", "chunk_sum_ms", "head_ms",
                          "head_pct_of_backbone", "per_action_ms", "ar_per_action_ms", "ar_over_rsd_per_action"}
        assert all(math.isfinite(v) and v >= 0 for v in m.values())
        assert (m["draft_ms"] > 0) == (name != "baseline")
        assert m["backbone_ms"] > 0 and m["main_ms"] > 0 and m["decode_ms"] > 0
        assert m["head_ms"] == pytest.approx(m["draft_ms"] + m["main_ms"] + m["decode_ms"])
        assert m["chunk_sum_ms"] == pytest.approx(m["backbone_ms"] + m["head_ms"])
        assert m["chunk_ms"] >= 0.9 * m["chunk_sum_ms"]  # the total also holds the engine's own bookkeeping
        assert m["per_action_ms"] == pytest.approx(m["chunk_ms"] / 8)
        assert m["head_pct_of_backbone"] == pytest.approx(100 * m["head_ms"] / m["backbone_ms"])
        assert m["ar_per_action_ms"] == pytest.approx(ar)
        assert m["ar_over_rsd_per_action"] == pytest.approx(ar / m["per_action_ms"]) and m["ar_over_rsd_per_action"] > 0
    t = row["chunk_summary"]["targets"]
    assert t["draft_ms"]["value"] == pytest.approx(row["ms"]["draft"]["median"])
    assert t["draft_ms"]["met"] == (t["draft_ms"]["value"] <= 0.1)
    pct = t["head_pct_of_backbone"]
    assert (pct["a3"], pct["a0"]) == (modes["strict_a3"]["head_pct_of_backbone"],
                                      modes["strict_a0"]["head_pct_of_backbone"])
    assert pct["met"] == (max(pct["a3"], pct["a0"]) <= 5.0)
    ratio = t["ar_over_rsd_per_action"]
    assert ratio["met"] == (min(ratio["a3"], ratio["a0"]) >= 20.0)


def _light_head_case():
    from rsd.tokenizer.rfsq import RFSQTokenizer

    main, _ = _models()
    torch.manual_seed(3)
    tok = RFSQTokenizer().eval()
    h = _hidden(2)
    ref = RSDInferenceEngine(main, mode="baseline", tokenizer=tok).predict(h)
    return main, tok, h, ref


@pytest.mark.parametrize("mode,options", [("eager", None), ("compile", {"backend": "aot_eager"}),
                                          ("cuda_graph", None)])
def test_light_head_as_one_function_equals_the_engines_baseline(mode, options):
    """main steps + RFSQ decode + gripper as one function (issue 21, item 4): the same computation as the engine's
    baseline (bit-equal tokens and actions); traced by dynamo/AOT without inductor here; cuda_graph on CPU falls
    back to eager with the reason."""
    from rsd.engine.accelerate import LightHead

    main, tok, h, ref = _light_head_case()
    head = LightHead(main, tok, mode, compile_options=options)
    for _ in range(2):  # the second call reuses the preallocated cache (and the compiled graph)
        tokens, actions = head(h)
        assert torch.equal(tokens, ref.tokens) and torch.equal(actions, ref.actions)
    if mode == "cuda_graph" and not torch.cuda.is_available():
        assert head.info["mode"] == "eager" and "CUDA" in head.info["fallback"]
    else:
        assert head.info["mode"] == mode and head.info["fallback"] is None, head.info


@pytest.mark.slow
def test_light_head_inductor_equals_eager():
    """The real torch.compile (inductor, C++ on CPU; ~30 s on a 2-core CPU): bit-equal tokens and actions in float32."""
    from rsd.engine.accelerate import LightHead

    main, tok, h, ref = _light_head_case()
    head = LightHead(main, tok, "compile")
    tokens, actions = head(h)
    if head.info["fallback"] is not None:
        pytest.skip(f"no inductor here: {head.info['fallback']}")
    assert torch.equal(tokens, ref.tokens) and torch.equal(actions, ref.actions)
