"""``main=vla_llm`` (rsd.models.vla_llm_main) on a tiny random-weight LLaVA built offline.

- the prompt's hidden state is the hf_vlm backbone's feature (what the draft reads);
- strict speculation gives the baseline's tokens at every forced accepted length 0..3 (float32), with
  the verification call's logits checked against the step-by-step logits within the top-2 margin;
- the KV cache after a rejected layer equals a cache that never saw it (dynamic and static caches);
- teacher forcing trains the heads (loss falls, LLM frozen) and a saved file reloads to the same logits;
- end to end without the simulator: a feature cache + frame images -> ``train.py experiment=main_vla_llm``
  (a few steps) -> the exported file -> the evaluation policy (``policy.factory=vla_llm``) acting for two
  short "episodes" of synthetic observations. The rendered-demo version (LIBERO) is ``test_vlm_backbones``'
  end-to-end test for the light main model; here the simulator part is replaced by synthetic images to
  stay within seconds on 2 cores.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from margins import LOGIT_MARGIN, assert_tokens_equal_up_to_near_ties, top2_gap  # noqa: E402

from rsd.engine.rsd_engine import RSDInferenceEngine  # noqa: E402
from rsd.models.draft import RFSQDraftModelWithProjection  # noqa: E402
from rsd.models.hf_cache import cache_length  # noqa: E402
from rsd.models.vla_llm_main import (  # noqa: E402
    LLMPrompt,
    VLALLMMain,
    VLAPromptBackbone,
    load_vla_llm_main,
    save_vla_llm_main,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

D = 64  # hidden size of the tiny LLaVA
TASK = "put the bowl on the stove"
# float32 on the same CPU: a 3-position LLM forward and three 1-position forwards round differently
# (different matmul shapes), at ~1e-6 of values of order 1; 1e-5 leaves a margin of 10x
ATOL = 1e-5


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    if _transformers_major() < 5:
        pytest.skip("the hf_vlm path (tiny LLaVA) needs transformers 5.x")
    from rsd.models.backbones.tiny_models import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny_llava", text_hidden_size=D)


@pytest.fixture(scope="module")
def parts(llava):
    from rsd.models.backbones import build_backbone

    bb = build_backbone("hf_vlm", model_path=str(llava), hidden_dim=D, device="cpu")
    prompts = VLAPromptBackbone(bb)
    torch.manual_seed(0)
    main = VLALLMMain(prompts.language_model()).eval()
    return bb, prompts, main


def _obs(seed: int) -> dict:
    return {"agentview_image": np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)}


class FixedDraft:
    """Proposes given tokens (forces an accepted length); the engine needs only ``propose``."""

    num_coarse_layers = 3

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def propose(self, hidden) -> torch.Tensor:
        return self.tokens.clone()


def _forced(baseline: torch.Tensor, a: int) -> torch.Tensor:
    """The baseline's layers 0..2 with layer ``a`` changed (``a = 3``: all three right)."""
    d = baseline[:, :3].clone()
    if a < 3:
        d[:, a] = (d[:, a] + 1) % 7
    return d


def test_prompt_is_the_backbone_feature_and_the_draft_reads_it(parts) -> None:
    bb, prompts, main = parts
    prompt = prompts([_obs(0)], [TASK])
    assert isinstance(prompt, LLMPrompt) and prompt.shape == (1, D) and prompt.length == cache_length(prompt.cache)
    # the same forward as the backbone's feature extraction, with a KV cache kept: equal up to float rounding
    assert torch.allclose(prompt.hidden, bb.encode([_obs(0)], [TASK]), atol=ATOL)
    draft = RFSQDraftModelWithProjection(input_dim=D, hidden_dim=32, num_heads=2, feedforward_dim=64).eval()
    with torch.no_grad():  # the draft sees the prompt as its hidden tensor (exactly the same computation)
        assert torch.equal(draft(prompt), draft(prompt.hidden))
    moved = prompt.to(device="cpu", dtype=torch.float32)
    assert moved.cache is prompt.cache and moved.length == prompt.length


def test_strict_speculation_equals_baseline(parts) -> None:
    _, prompts, main = parts
    prompt = prompts([_obs(1)], [TASK])
    base = RSDInferenceEngine(main, mode="baseline")
    ref = base.predict(prompt, decode=False)
    assert ref.main_calls == 8
    for a in range(4):
        engine = RSDInferenceEngine(main, FixedDraft(_forced(ref.tokens, a)), mode="strict")
        out = engine.predict(prompt, decode=False)
        assert out.accepted_length == a and out.main_calls == 8 - a
        assert torch.equal(out.tokens, ref.tokens), f"a={a}: {(out.tokens != ref.tokens).sum()} tokens differ"
    # why the token equality is not luck: the verification call's logits (layers 0..3 in one LLM forward)
    # differ from the step-by-step ones by less than every position's top-2 logit gap
    with torch.no_grad():
        verify = main.score(prompt, ref.tokens[:, :3], main.new_cache(1))
        cache = main.new_cache(1)
        steps = [main.score(prompt, None, cache)] + [main.extend(ref.tokens[:, k - 1:k], cache) for k in (1, 2, 3)]
    steps = torch.cat(steps, dim=1)
    diff = float((verify - steps).abs().max())
    top2 = steps.topk(2, dim=-1).values
    gap = float((top2[..., 0] - top2[..., 1]).min())
    assert diff < ATOL and 2 * diff < gap, (diff, gap)


def test_kv_cache_after_rejected_layer_equals_cache_that_never_saw_it(parts) -> None:
    _, prompts, main = parts
    prompt = prompts([_obs(2)], [TASK])
    with torch.no_grad():
        tokens = RSDInferenceEngine(main, mode="baseline").predict(prompt, decode=False).tokens
        prompt_kv = [(layer.keys.clone(), layer.values.clone()) for layer in prompt.cache.layers]
        drafted = _forced(tokens, 1)  # layer 0 accepted, layer 1 rejected, layer 2 never reached
        cache = main.new_cache(1)
        main.score(prompt, drafted, cache)  # the prompt + 3 drafted layer positions
        assert cache_length(prompt.cache) == prompt.length + 3
        cache.truncate(2)  # the prompt + layer 0, as the engine keeps it
        seen = [(layer.keys.clone(), layer.values.clone()) for layer in prompt.cache.layers]
        next_seen = main.extend(tokens[:, 1:2], cache)
        fresh = main.new_cache(1)
        main.score(prompt, drafted[:, :1], fresh)  # a cache that only ever saw layer 0
        never = [(layer.keys.clone(), layer.values.clone()) for layer in prompt.cache.layers]
        next_never = main.extend(tokens[:, 1:2], fresh)
    n = prompt.length
    for (k1, v1), (k2, v2), (k0, v0) in zip(seen, never, prompt_kv, strict=True):
        assert k1.shape == k2.shape and k1.shape[2] == n + 1
        # the prompt positions are the prompt's own tensors, never written: bit-equal
        assert torch.equal(k1[:, :, :n], k0[:, :, :n]) and torch.equal(v1[:, :, :n], v0[:, :, :n])
        # layer 0's position: computed in a 3-position forward vs a 1-position forward (float rounding)
        assert torch.allclose(k1, k2, atol=ATOL) and torch.allclose(v1, v2, atol=ATOL)
    assert torch.allclose(next_seen, next_never, atol=ATOL)


def test_static_cache_matches_dynamic(parts) -> None:
    bb, prompts, main = parts
    dynamic = prompts([_obs(3)], [TASK])
    static_prompts = VLAPromptBackbone(bb, static_cache_len=dynamic.length + 8)
    static = static_prompts([_obs(3)], [TASK])
    assert type(static.cache).__name__ == "StaticCache" and cache_length(static.cache) == dynamic.length
    ref = RSDInferenceEngine(main, mode="baseline").predict(dynamic, decode=False).tokens
    out = RSDInferenceEngine(main, mode="baseline").predict(static, decode=False).tokens
    # the two caches compute attention over different lengths (static: padded and masked), so logits may
    # round apart by ~1e-6: a token may differ only where the greedy choice leads by less than LOGIT_MARGIN
    with torch.inference_mode():
        gaps = top2_gap(main(dynamic, ref[:, :7]))
    assert_tokens_equal_up_to_near_ties(out, ref, gaps)
    assert (gaps > LOGIT_MARGIN).float().mean() > 0.99  # near-ties are rare: the comparison is not vacuous
    # rejected layers: only the write position moves back; stale entries are masked. Inference mode, as the
    # engine's: the prompt's static cache was allocated in it (in-place updates need it)
    with torch.inference_mode():
        cache = main.new_cache(1)
        main.score(static, _forced(ref, 0), cache)
        cache.truncate(1)
        assert cache_length(static.cache) == static.length
        after = main.extend(ref[:, :1], cache)
        fresh = main.new_cache(1)
        main.score(dynamic, None, fresh)
        expected = main.extend(ref[:, :1], fresh)
    assert torch.allclose(after, expected, atol=ATOL)
    spec = RSDInferenceEngine(main, FixedDraft(_forced(ref, 2)), mode="strict").predict(static, decode=False)
    if gaps[:, :2].min() > LOGIT_MARGIN:  # the drafted layers are the clear greedy choices: both accepted
        assert spec.accepted_length == 2
    assert_tokens_equal_up_to_near_ties(spec.tokens, ref, gaps)


def test_teacher_forcing_trains_heads_and_file_round_trip(parts, tmp_path) -> None:
    bb, prompts, _ = parts
    torch.manual_seed(1)
    main = VLALLMMain(prompts.language_model())
    llm_before = {k: v.clone() for k, v in main.language_model.state_dict().items()}
    target = torch.randint(0, 7, (2, 8, 128), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in main.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        prompt = prompts.encode([_obs(4), _obs(5)], [TASK, TASK])  # no inference mode: a training prompt
        logits = main(prompt, target[:, :7])
        assert logits.shape == (2, 8, 128, 7)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 7), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(v, llm_before[k]) for k, v in main.language_model.state_dict().items())
    path = save_vla_llm_main(main.eval(), tmp_path / "vla_llm_main.pt", bb.config(), note="test")
    payload = torch.load(path, weights_only=True)
    assert not any(k.startswith("language_model.") for k in payload["state_dict"])  # frozen LLM not copied
    loaded, loaded_prompts = load_vla_llm_main(path, backbone=bb)
    with torch.no_grad():
        prompt = prompts([_obs(6)], [TASK])
        a = main(prompt, target[:1, :7])
        b = loaded(prompt, target[:1, :7])
    assert torch.equal(a, b)  # same weights, same computation


# ---------------------------------------------------------------------- end to end (no simulator)
def _synthetic_cache(root, bb, tokenizer_path) -> tuple:
    """A feature cache of 2 episodes x 6 frames (one train, one val) with the hf_vlm features, and its
    frame images (random pictures standing in for rendered LIBERO frames)."""
    from rsd.data.cache import write_cache
    from rsd.tokenizer.rfsq import RFSQTokenizer

    tok = RFSQTokenizer.load(tokenizer_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    hidden = bb.encode([{"agentview_image": im} for im in images], [TASK] * 12).numpy()
    actions = rng.uniform(-0.5, 0.5, (12, 8, 7)).astype(np.float32)
    from rsd.tokenizer.layout import codes_to_layers

    with torch.no_grad():
        tokens = codes_to_layers(tok.encode(torch.from_numpy(actions))).numpy()
    manifest = {"format": "rsd.feature_cache", "version": 1, "suite": "libero_spatial",
                "backbone": {"name": "hf_vlm", "id": bb.backbone_id, "hidden_dim": D, "needs_images": True,
                             "feature_definition": bb.feature_definition, "config": bb.config()},
                "tasks": [{"task_id": 0, "language": TASK}],
                "episodes": [{"key": f"libero_spatial/0/demo_{i}", "task_id": 0, "demo": f"demo_{i}",
                              "file": "x_demo.hdf5", "start": 6 * i, "length": 6, "split": ["train", "val"][i]}
                             for i in range(2)],
                "tokenizer": {"identity": tok.identity(), "path": str(tokenizer_path)},
                "created": "2024-01-01T00:00:00+00:00"}
    cache = write_cache(root / "cache" / "hf_vlm_libero_spatial", hidden, tokens, actions,
                        np.repeat([0, 1], 6), np.zeros(12), np.repeat([0, 1], 6), manifest)
    images_dir = root / "cache" / "hf_vlm_libero_spatial_images"
    images_dir.mkdir(parents=True)
    np.save(images_dir / "images.npy", images)
    (images_dir / "manifest.json").write_text(json.dumps({"format": "rsd.vla_frame_images", "num_frames": 12,
                                                           "cache_created": manifest["created"]}))
    return cache, images


def test_end_to_end_train_export_and_act(llava, parts, tmp_path) -> None:
    """Cache + frame images -> train.py experiment=main_vla_llm (2 steps) -> vla_llm_main.pt -> the
    evaluation policy acting for two short synthetic episodes, speculative and baseline."""
    from hydra import compose, initialize_config_dir

    from rsd.models.checkpoint import save_draft_checkpoint
    from rsd.policies import build_policy
    from rsd.tokenizer.rfsq import RFSQTokenizer
    from rsd.utils.config import CONFIG_DIR

    bb = parts[0]
    torch.manual_seed(0)
    tok = RFSQTokenizer(hidden_dim=32, mlp_depth=1)
    tok.normalizer.fit(np.random.default_rng(1).uniform(-1, 1, (64, 7)).astype(np.float32))
    tok_path = tok.save(tmp_path / "rfsq.pt")
    cache, images = _synthetic_cache(tmp_path, bb, tok_path)
    logs = tmp_path / "logs"
    out_dir = logs / "main_vla_llm" / "runs" / "r1"
    overrides = ["experiment=main_vla_llm", f"backbone.model_path={llava}", f"backbone.hidden_dim={D}",
                 "backbone.device=cpu", f"data.cache_dir={cache}", "data.batch_size=3", "data.val_batch_size=6",
                 "data.render_if_missing=false", "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=csv",
                 "callbacks.progress_bar=null", f"paths.log_dir={logs}", f"paths.output_dir={out_dir}",
                 "model.warmup_steps=1"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    assert cfg.model.backbone.name == "hf_vlm" and cfg.data.images_dir is None
    from rsd.train import train

    metrics = train(cfg)
    assert "val/accuracy" in metrics and np.isfinite(float(metrics["val/accuracy"]))
    exported = out_dir / "vla_llm_main.pt"
    assert exported.is_file()
    ckpts = list((out_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts and all(not any(k.startswith("main.language_model.") for k in
                                 torch.load(c, weights_only=False)["state_dict"]) for c in ckpts)

    draft = RFSQDraftModelWithProjection(input_dim=D, hidden_dim=32, num_heads=2, feedforward_dim=64)
    draft_path = save_draft_checkpoint(tmp_path / "draft.pt", draft.state_dict(), None, epoch=0, val_accuracy=0.0,
                                       model_config=dict(input_dim=D, hidden_dim=32, num_heads=2,
                                                         feedforward_dim=64))
    policy = build_policy({"factory": "vla_llm", "main_ckpt": str(exported),
                           "ckpt": str(draft_path), "tokenizer": str(tok_path), "device": "cpu"})
    assert policy.needs_images
    for episode in range(2):  # two short episodes, each 2 chunks, speculative then baseline on the same frames
        got = {}
        for mode in ("speculative", "baseline"):
            policy.reset(None, mode, episode)
            got[mode] = [policy.act({"agentview_image": images[6 * episode + t]}, TASK) for t in range(2)]
        for (a_spec, s_spec), (a_base, s_base) in zip(got["speculative"], got["baseline"], strict=True):
            assert a_spec.shape == (8, 7) and np.isfinite(a_spec).all()
            assert s_spec["backbone_ms"] > 0 and s_spec["drafted_layers"] == 3 and s_base["main_steps"] == 8
            assert np.array_equal(a_spec, a_base)  # strict: lossless
