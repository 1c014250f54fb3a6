"""Vision-language backbones (``openvla``, ``hf_vlm``) on tiny random-weight models built offline.

- ``openvla``: a tiny OpenVLA-shaped model directory whose remote code this project wrote for the test
  (``tests/fixtures/tiny_openvla``), loaded through the adapter with ``trust_remote_code=True``;
- ``hf_vlm``: a tiny LLaVA (``rsd.models.backbones.tiny_models.build_tiny_llava``);
- bad input: no remote code, wrong hidden size, CUDA without a GPU, missing image, changed model files;
- end to end (``sim``): demo file without images -> cache with images rendered from the stored states ->
  a few draft / main training steps -> a short LIBERO evaluation with the hf_vlm backbone.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from rsd.models.backbones import (  # noqa: E402
    backbone_from_config,
    backbone_from_manifest,
    build_backbone,
    check_hidden_dim,
)
from rsd.models.backbones.base import BackboneError  # noqa: E402
from rsd.models.backbones.hf_vlm import (  # noqa: E402
    DeviceUnavailableError,
    HFVLMBackbone,
    HiddenDimMismatchError,
    MissingRemoteCodeError,
    ModelNotFoundError,
    VLMBackboneError,
    prepare_image,
)
from rsd.models.backbones.openvla import EMPTY_TOKEN_ID, OpenVLABackbone  # noqa: E402
from rsd.models.backbones.tiny_models import build_tiny_llava  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny_openvla"
D = 64  # hidden size of both tiny models
SUITE = "libero_spatial"


def _load_fixture_builder():
    spec = importlib.util.spec_from_file_location("tiny_openvla_build", FIXTURE / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.build_tiny_openvla


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


@pytest.fixture(scope="module")
def openvla_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny OpenVLA-shaped remote-code models (these tests also run in the openvla env, transformers 4.40)."""
    root = tmp_path_factory.mktemp("openvla")
    build_tiny_openvla = _load_fixture_builder()
    return {"openvla": build_tiny_openvla(root / "tiny_openvla", hidden_size=D),
            "openvla_oft": build_tiny_openvla(root / "tiny_openvla_oft", hidden_size=D, oft=True)}


@pytest.fixture(scope="module")
def models(openvla_models, tmp_path_factory) -> dict[str, Path]:
    if _transformers_major() < 5:
        pytest.skip("the hf_vlm path (AutoModelForImageTextToText, tiny LLaVA) needs transformers 5.x")
    return {**openvla_models, "llava": build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny_llava",
                                                         text_hidden_size=D)}


def _obs(seed: int, size: int = 128) -> dict:
    return {"agentview_image": np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)}


INSTRUCTIONS = ["Pick up the black bowl next to the ramekin and place it on the plate",
                "put the bowl on the stove",
                "Pick up the black bowl next to the ramekin and place it on the plate"]


# ------------------------------------------------------------------------------------------------ openvla
def test_openvla_fixture_loads_through_auto_classes(openvla_models) -> None:
    """The fixture directory is a remote-code model like OpenVLA's: Auto classes + trust_remote_code load it."""
    import transformers
    from transformers import AutoProcessor

    path = openvla_models["openvla"]
    cfg = json.loads((path / "config.json").read_text())
    assert "AutoModelForVision2Seq" in cfg["auto_map"] and (path / "modeling_tiny_openvla.py").is_file()
    processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=True)
    batch = processor(["In: What action should the robot take to x?\nOut:", "hi"], [_obs(0)["agentview_image"]] * 2)
    assert set(batch) >= {"input_ids", "attention_mask", "pixel_values"}
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padding
    for name in ("AutoModelForVision2Seq", "AutoModelForImageTextToText", "AutoModel"):
        if hasattr(transformers, name):
            model = getattr(transformers, name).from_pretrained(str(path), trust_remote_code=True)
            assert type(model).__name__ == "TinyOpenVLAForActionPrediction"


def test_openvla_backbone_features(openvla_models) -> None:
    bb = build_backbone("openvla", model_path=str(openvla_models["openvla"]), hidden_dim=D, batch_size=2)
    assert isinstance(bb, OpenVLABackbone) and bb.needs_images and bb.hidden_dim == D
    assert bb.device.type == "cpu" and bb.model_dtype == torch.float32

    # prompt exactly as OpenVLA: lowercased task, BOS first, empty token 29871 appended
    prompt = bb.build_prompt("Put The Bowl On The Stove")
    assert prompt == "In: What action should the robot take to put the bowl on the stove?\nOut:"
    img = bb.prepare_image(_obs(0))
    inputs = bb.model_inputs([prompt], [img])
    ids = bb.processor.tokenizer(prompt)["input_ids"]
    assert ids[0] == bb.processor.tokenizer.bos_token_id
    assert inputs["input_ids"][0].tolist() == [*ids, EMPTY_TOKEN_ID]
    assert inputs["attention_mask"][0].tolist() == [1] * (len(ids) + 1)

    # the image: rotated 180 degrees, resized to 224 with PIL
    raw = _obs(0)["agentview_image"]
    from PIL import Image

    expected = Image.fromarray(np.ascontiguousarray(raw[::-1, ::-1])).resize((224, 224), Image.LANCZOS)
    assert np.array_equal(np.asarray(img), np.asarray(expected))

    # hidden = hidden_states[-1][:, -1] of one forward
    with torch.no_grad():
        out = bb.model(**inputs, output_hidden_states=True)
    h1 = bb.encode([_obs(0)], ["Put The Bowl On The Stove"])
    assert h1.shape == (1, D) and h1.dtype == torch.float32
    assert torch.allclose(h1, out.hidden_states[-1][:, -1], atol=1e-6)

    # a batch (two prompts of different lengths, batch_size 2) agrees with the samples alone
    observations = [_obs(1), _obs(2), _obs(3)]
    batch = bb.encode(observations, INSTRUCTIONS)
    alone = torch.cat([bb.encode([o], [i]) for o, i in zip(observations, INSTRUCTIONS, strict=True)])
    assert batch.shape == (3, D) and torch.isfinite(batch).all()
    assert torch.allclose(batch, alone, atol=1e-5)
    # features depend on the image (same prompt, another image) and on the instruction
    assert (batch[0] - batch[2]).abs().max() > 1e-3
    assert (bb.encode([_obs(1)], [INSTRUCTIONS[1]]) - batch[0]).abs().max() > 1e-3

    # rebuilt from its config (what the cache manifest stores): same id, same features
    cfg = json.loads(json.dumps(bb.config()))
    assert cfg["name"] == "openvla" and cfg["hidden_dim"] == D and cfg["empty_token_id"] == EMPTY_TOKEN_ID
    again = backbone_from_config(cfg)
    assert again.backbone_id == bb.backbone_id == OpenVLABackbone.id_from_config(
        {"model_path": str(openvla_models["openvla"])})
    assert torch.allclose(again.encode(observations[:1], INSTRUCTIONS[:1]), batch[:1], atol=1e-6)
    assert "29871" in bb.feature_definition and "[::-1, ::-1]" in bb.feature_definition


def test_openvla_auto_map_as_in_the_real_checkpoints(openvla_models, tmp_path) -> None:
    """OpenVLA's config.json names only AutoConfig + AutoModelForVision2Seq (gone in transformers 5.x):
    the adapter then resolves the class from auto_map itself."""
    path = tmp_path / "vision2seq_only"
    shutil.copytree(openvla_models["openvla"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {k: v for k, v in cfg["auto_map"].items() if k in ("AutoConfig", "AutoModelForVision2Seq")}
    (path / "config.json").write_text(json.dumps(cfg))
    bb = build_backbone("openvla", model_path=str(path), hidden_dim=D)
    ref = build_backbone("openvla", model_path=str(openvla_models["openvla"]), hidden_dim=D)
    assert type(bb.model).__name__ == "TinyOpenVLAForActionPrediction"
    assert torch.allclose(bb.encode([_obs(4)], ["x"]), ref.encode([_obs(4)], ["x"]), atol=1e-6)
    assert bb.backbone_id != ref.backbone_id  # another config.json: another model identity


def test_openvla_oft_forward_gets_prompt_only_labels(openvla_models) -> None:
    """OpenVLA-OFT's forward derives action masks from labels: the adapter passes labels with no action token."""
    oft = build_backbone("openvla", model_path=str(openvla_models["openvla_oft"]), hidden_dim=D)
    plain = build_backbone("openvla", model_path=str(openvla_models["openvla"]), hidden_dim=D)
    assert oft.forward_needs_labels and not plain.forward_needs_labels
    inputs = oft.model_inputs([oft.build_prompt("x")], [oft.prepare_image(_obs(1))])
    assert (inputs["labels"] == -100).all() and "labels" not in plain.model_inputs(
        [plain.build_prompt("x")], [plain.prepare_image(_obs(1))])
    with pytest.raises(TypeError):  # what OFT's own forward does without labels
        oft.model(**{k: v for k, v in inputs.items() if k != "labels"})
    observations = [_obs(1), _obs(2)]
    # same seed and architecture: the OFT-shaped model computes the same features
    assert torch.allclose(oft.encode(observations, INSTRUCTIONS[:2]), plain.encode(observations, INSTRUCTIONS[:2]),
                          atol=1e-5)


# ------------------------------------------------------------------------------------------------ hf_vlm
def test_hf_vlm_tiny_llava_features(models) -> None:
    bb = build_backbone("hf_vlm", model_path=str(models["llava"]), hidden_dim=D)
    assert isinstance(bb, HFVLMBackbone) and bb.hidden_dim == D and bb.padding == "left"
    assert bb.processor.tokenizer.padding_side == "left"
    prompt = bb.build_prompt(INSTRUCTIONS[1])
    assert prompt == "<image>\nIn: What action should the robot take to put the bowl on the stove?\nOut:"

    observations = [_obs(1), _obs(2), _obs(3)]
    inputs = bb.model_inputs([bb.build_prompt(i) for i in INSTRUCTIONS], [bb.prepare_image(o) for o in observations])
    assert (inputs["attention_mask"][1] == 0).any()  # the short prompt really is left-padded
    batch = bb.encode(observations, INSTRUCTIONS)
    alone = torch.cat([bb.encode([o], [i]) for o, i in zip(observations, INSTRUCTIONS, strict=True)])
    assert batch.shape == (3, D) and torch.isfinite(batch).all()
    assert torch.allclose(batch, alone, atol=1e-4), (batch - alone).abs().max()
    assert (batch[0] - batch[2]).abs().max() > 1e-3  # the image matters

    # padding=group gives the same features; the chat template gives another (documented) prompt
    grouped = build_backbone("hf_vlm", model_path=str(models["llava"]), padding="group")
    assert torch.allclose(grouped.encode(observations, INSTRUCTIONS), alone, atol=1e-4)
    assert grouped.backbone_id == bb.backbone_id  # batching does not change the feature
    chat = build_backbone("hf_vlm", model_path=str(models["llava"]), chat_template=True)
    assert chat.build_prompt("Do It").startswith("USER: <image>\nIn: What action should the robot take to do it?")
    assert chat.backbone_id != bb.backbone_id and chat.encode([_obs(1)], ["x"]).shape == (1, D)
    again = backbone_from_config(json.loads(json.dumps(bb.config())))
    assert again.backbone_id == bb.backbone_id == HFVLMBackbone.id_from_config({"model_path": str(models["llava"])})
    assert torch.allclose(again.encode(observations[:1], INSTRUCTIONS[:1]), alone[:1], atol=1e-6)


def test_prepare_image_center_crop_and_floats() -> None:
    raw = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    a = prepare_image(raw, 224)
    b = prepare_image(raw.astype(np.float32) / 255.0, 224)
    assert a.size == (224, 224) and np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 1
    c = prepare_image(raw, 224, center_crop=True)
    assert c.size == (224, 224) and not np.array_equal(np.asarray(a), np.asarray(c))
    with pytest.raises(VLMBackboneError, match="image array"):
        prepare_image(np.zeros((4, 4)), 224)


def test_configs_match_constructors() -> None:
    from hydra import compose, initialize_config_dir

    from rsd.utils.config import CONFIG_DIR

    for name, cls in (("hf_vlm", HFVLMBackbone), ("openvla", OpenVLABackbone)):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=["experiment=draft_proj", f"backbone={name}",
                                                          "paths.output_dir=/tmp/rsd-compose"])
        keys = set(cfg.backbone) - {"name"}
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert cfg.backbone.name == name and keys <= params, keys - params
        assert {"model_path", "device", "dtype", "batch_size", "hidden_dim"} <= keys
        assert cfg.prepare.cache.dir.endswith(f"{name}_libero_spatial") and cfg.prepare.cache.backbone.name == name
        assert cfg.data.cache_dir == cfg.prepare.cache.dir
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=draft_proj", "backbone=openvla",
                                                      "paths.output_dir=/tmp/rsd-compose"])
    assert cfg.model.net.input_dim == 4096 and cfg.data.cache_dir.endswith("openvla_libero_spatial")


# ------------------------------------------------------------------------------------------------ bad input
def test_openvla_bad_inputs(openvla_models, tmp_path, monkeypatch) -> None:
    # a directory without remote code: no .py files / no auto_map
    no_code = tmp_path / "no_code"
    shutil.copytree(openvla_models["openvla"], no_code)
    for f in no_code.glob("*.py"):
        f.unlink()
    with pytest.raises(MissingRemoteCodeError, match=r"lacks the remote code.*modeling_tiny_openvla\.py"):
        build_backbone("openvla", model_path=str(no_code))
    cfg = json.loads((no_code / "config.json").read_text())
    cfg.pop("auto_map")
    (no_code / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MissingRemoteCodeError, match="no auto_map.*download the whole model repository"):
        build_backbone("openvla", model_path=str(no_code))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        build_backbone("openvla", model_path=str(tmp_path / "nowhere"))
    # hidden size differs from the cache's / config's
    with pytest.raises(HiddenDimMismatchError, match="size 64.*expects 4096.*backbone.hidden_dim=64"):
        build_backbone("openvla", model_path=str(openvla_models["openvla"]), hidden_dim=4096)
    bb = build_backbone("openvla", model_path=str(openvla_models["openvla"]))
    check_hidden_dim(bb, D)
    check_hidden_dim(bb, None)
    with pytest.raises(HiddenDimMismatchError, match="the feature cache expects 4096"):
        check_hidden_dim(bb, 4096)
    assert issubclass(HiddenDimMismatchError, BackboneError)
    # no image in the observation (env built without cameras); left padding refused for OpenVLA
    with pytest.raises(VLMBackboneError, match="no 'agentview_image'.*needs_images"):
        bb.encode([{"robot0_eef_pos": np.zeros(3)}], ["x"])
    with pytest.raises(ValueError, match="padding=group"):
        build_backbone("openvla", model_path=str(openvla_models["openvla"]), padding="left")
    # the model files changed since the features were computed
    cfg = bb.config()
    cfg["model_digest"] = "0" * 16
    with pytest.raises(VLMBackboneError, match="differ from those the features were computed with"):
        backbone_from_config(cfg)
    # CUDA requested on a machine without a GPU (simulated where one exists)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="no usable CUDA GPU.*device=cpu"):
        build_backbone("openvla", model_path=str(openvla_models["openvla"]), device="cuda:0")


def test_hf_vlm_bad_inputs(models, tmp_path, monkeypatch) -> None:
    # a native transformers model is not an OpenVLA directory (no remote code)
    with pytest.raises(MissingRemoteCodeError, match="backbone=hf_vlm"):
        build_backbone("openvla", model_path=str(models["llava"]))
    with pytest.raises(ModelNotFoundError, match="no model_path"):
        build_backbone("hf_vlm", model_path=None)
    with pytest.raises(ModelNotFoundError, match="config.json"):
        build_backbone("hf_vlm", model_path=str(tmp_path))
    with pytest.raises(HiddenDimMismatchError, match="size 64.*expects 4096.*backbone.hidden_dim=64"):
        build_backbone("hf_vlm", model_path=str(models["llava"]), hidden_dim=4096)
    with pytest.raises(ValueError, match="resample"):
        build_backbone("hf_vlm", model_path=str(models["llava"]), resample="cubic-ish")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="no usable CUDA GPU.*device=cpu"):
        build_backbone("hf_vlm", model_path=str(models["llava"]), device="cuda")
    auto = build_backbone("hf_vlm", model_path=str(models["llava"]), device="auto")
    assert auto.device.type == "cpu" and auto.model_dtype == torch.float32


# ------------------------------------------------------------------------------------------------ end to end
def _train(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from rsd.utils.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    import rsd.train as module
    return cfg, module.train(cfg)


@pytest.mark.sim
def test_hf_vlm_end_to_end_cache_train_evaluate(models, tmp_path) -> None:
    """Demo file without images -> cache (images rendered from the stored states) -> draft/main training
    steps -> LIBERO evaluation with images, all with the tiny LLaVA as the backbone."""
    pytest.importorskip("libero")
    import h5py

    from rsd.data.cache import build_cache, open_cache
    from rsd.data.heldout import TrainStatesError
    from rsd.data.libero_hdf5 import Episode, demo_path, write_demo_file
    from rsd.data.record import run_expert_episode
    from rsd.data.splits import is_validation_episode
    from rsd.envs.libero_env import get_init_states, get_task, make_env
    from rsd.eval.runner import run_evaluation
    from rsd.policies import resolve_policy_spec
    from rsd.tokenizer.rfsq import RFSQTokenizer

    task = get_task(SUITE, 0)
    # one env for the demo and for rendering frame 5 again; closed before the cache builder opens its own
    # (closing one robosuite EGL env breaks the rendering of another open in the same process)
    env = make_env(task, images=True)
    try:
        ep = run_expert_episode(env, task, get_init_states(SUITE, 0)[0], init_state_index=0, max_steps=12)
        assert ep.error is None and ep.num_steps == 12
        obs5 = {k: np.array(v, copy=True) for k, v in env.regenerate_obs_from_state(ep.states[5]).items()}
    finally:
        env.close()
    episodes = [Episode(actions=ep.actions, states=ep.states, obs=ep.obs, robot_states=ep.robot_states,
                        rewards=ep.rewards, dones=ep.dones) for _ in range(2)]
    demo_file = write_demo_file(demo_path(tmp_path / "demos", SUITE, task.name), task, episodes)  # no images
    val_key = next(f"demo_{i}" for i in range(1, 1000) if is_validation_episode(f"{SUITE}/0/demo_{i}"))
    assert not is_validation_episode(f"{SUITE}/0/demo_0")
    with h5py.File(demo_file, "a") as f:  # one training and one validation demo (the shared split rule)
        f.move("data/demo_1", f"data/{val_key}")
        assert "agentview_rgb" not in f["data/demo_0/obs"]
    tok = RFSQTokenizer(hidden_dim=32, mlp_depth=1)
    tok.normalizer.fit(ep.actions)
    tok_path = tok.save(tmp_path / "rfsq.pt")

    backbone = {"name": "hf_vlm", "model_path": str(models["llava"]), "hidden_dim": D, "batch_size": 8}
    cache = build_cache(SUITE, tmp_path / "cache", tok_path, tmp_path / "demos", backbone_from_config(backbone),
                        hidden_dtype="float32", progress=False)
    manifest, arrays = open_cache(cache)
    assert manifest["num_frames"] == 24 and manifest["num_val_episodes"] == 1
    assert manifest["backbone"]["name"] == "hf_vlm" and manifest["backbone"]["hidden_dim"] == D
    assert manifest["backbone"]["needs_images"] is True
    hidden = np.asarray(arrays["hidden"])
    assert np.isfinite(hidden).all() and np.abs(hidden[:12] - hidden[0]).max() > 1e-3  # frames differ
    assert np.allclose(hidden[:12], hidden[12:], atol=1e-5)  # same states -> same features
    # evaluation rebuilds the backbone from the manifest and reproduces the cached feature of frame 5
    bb = backbone_from_manifest(manifest)
    assert np.allclose(bb.encode([obs5], [task.language]).numpy()[0], hidden[5], atol=1e-4)
    del bb

    # a few training steps of the draft and of the main decoder on that cache
    logs = tmp_path / "logs"
    common = [f"data.cache_dir={cache}", f"data.tokenizer_path={tok_path}", "prepare.until=null",
              "backbone=hf_vlm", f"backbone.model_path={models['llava']}", f"backbone.hidden_dim={D}",
              "data.batch_size=4", "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=csv",
              "callbacks.progress_bar=null", f"paths.log_dir={logs}"]
    _, metrics = _train(["experiment=draft_proj_gt", *common, f"paths.output_dir={logs}/draft_proj/runs/r1",
                         "model.net.hidden_dim=32", "model.net.feedforward_dim=64", "model.net.num_heads=2"])
    assert "val/accuracy" in metrics
    draft_file = logs / "draft_proj/runs/r1/best_draft_with_projection.pt"
    assert draft_file.is_file()
    _train(["experiment=main_head", *common, f"paths.output_dir={logs}/main_head/runs/r1",
            "model.net.d_model=32", "model.net.num_blocks=1", "model.net.num_heads=2",
            "model.net.ff_dim=64", "model.warmup_steps=1"])
    assert (logs / "main_head/runs/r1/main_decoder.pt").is_file()

    # a short evaluation with images: the backbone comes from the draft's cache identity
    # (ckpt=best wants pipeline artifacts; these models are plain runs, so the paths are given)
    spec = resolve_policy_spec({"factory": "engine", "suite": SUITE, "ckpt": str(draft_file), "log_dir": str(logs),
                                "tokenizer": None, "main_ckpt": str(logs / "main_head/runs/r1/main_decoder.pt"),
                                "backbone": None, "device": "cpu",
                                "acceptance": "strict", "delta": 1, "tau": None, "chunk_len": 8})
    assert spec["ckpt"] == str(draft_file) and spec["tokenizer"] == str(tok_path)
    # models built outside the pipeline name no hashed training data (and the demo here even starts from
    # official init state 0): the evaluation is refused unless asked for, and then the verdict says so
    with pytest.raises(TrainStatesError, match="start scenes cannot be checked"):
        run_evaluation(SUITE, spec, tmp_path / "eval", tasks=[0], trials=[0], mode="speculative", workers=0,
                       max_steps=16, progress=False)
    run = run_evaluation(SUITE, spec, tmp_path / "eval", tasks=[0], trials=[0], mode="speculative", workers=0,
                         max_steps=16, progress=False, allow_train_states=True)
    assert run.heldout["status"] != "held_out" and run.heldout["allow_train_states"] is True
    assert any("rfsq.pt" in u for u in run.heldout["unverifiable"])
    (rec,) = run.records
    assert rec["error"] is None, rec.get("traceback")
    assert rec["steps"] == 16 and rec["num_inferences"] == 2
    assert rec["engine_stats"]["backbone_ms"] > 0 and rec["engine_stats"]["drafted_layers"] == 6
