"""Feature cache, draft training (Lightning + Hydra) and draft checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from factories import BACKBONE, TOKENIZER_ID, D, _episode_keys, make_tiny_cache  # noqa: E402
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rsd.data.cache import (
    CacheError,
    CacheMismatchError,
    open_cache,
    read_manifest,
)
from rsd.data.cache_datamodule import FeatureCacheDataModule
from rsd.models.backbones import requested_backbone_id
from rsd.models.checkpoint import (
    DraftCheckpointError,
    inspect_checkpoint,
    load_draft_checkpoint,
    resolve_draft_checkpoint,
)
from rsd.models.checkpoint import (
    main as checkpoint_cli,
)
from rsd.models.draft import RFSQDraftModelWithProjection
from rsd.utils.config import CONFIG_DIR


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _train_overrides(tmp_path: Path, cache_dir: Path, *extra: str, run: str = "r1") -> list[str]:
    return ["experiment=draft_proj_gt", f"data.cache_dir={cache_dir}", f"data.tokenizer_identity={TOKENIZER_ID}",
            f"backbone.hidden_dim={D}", "data.batch_size=32", "prepare.until=null",
            f"paths.log_dir={tmp_path / 'logs'}", f"paths.output_dir={tmp_path / 'logs/draft_proj_gt/runs' / run}",
            "logger=csv", "callbacks.progress_bar=null", "trainer.accelerator=cpu",
            "model.net.hidden_dim=64", "model.net.feedforward_dim=128", "model.net.num_heads=4", *extra]


def _train(cfg):


    import rsd.train as module
    return module.train(cfg)


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("experiment", sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment: str) -> None:
    cfg = _compose([f"experiment={experiment}", "paths.output_dir=/tmp/rsd-compose"])
    assert cfg.task_name
    for group in ("data", "model"):
        assert cfg[group] is not None and "_target_" in cfg[group], f"{experiment}: no {group}"
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_draft_configs() -> None:
    cfg = _compose(["experiment=draft_proj", "paths.output_dir=/tmp/x"])
    assert cfg.model.net.input_dim == cfg.backbone.hidden_dim == 4096
    # one place decides each artifact's folder (conf/prepare from conf/paths); the data config reads it
    assert cfg.data.cache_dir == cfg.prepare.cache.dir and cfg.data.cache_dir.endswith("data/cache/sim_state_libero_spatial")
    assert cfg.data.tokenizer_path == f"{cfg.prepare.tokenizer.dir}/rfsq.pt"
    assert cfg.data.distill_probs.startswith(cfg.prepare.distill.dir)
    # make train's draft is distilled from the main model it is evaluated with: the pipeline runs to `distill`
    assert cfg.prepare.until == "distill" and cfg.data.targets == "distill_soft" and cfg.artifact.kind == "draft"
    assert "export_draft" in cfg.callbacks and cfg.callbacks.model_checkpoint.monitor == "val/accuracy"
    gt = _compose(["experiment=draft_proj_gt", "paths.output_dir=/tmp/x"])
    assert gt.prepare.until == "cache" and gt.data.targets == "ground_truth"
    small = _compose(["experiment=draft_proj_small", "paths.output_dir=/tmp/x"])
    assert small.model.net.hidden_dim == 256


def test_vlm_backbones_need_a_model_path() -> None:
    from rsd.models.backbones import BACKBONES, build_backbone
    from rsd.models.backbones.hf_vlm import ModelNotFoundError

    assert {"sim_state", "hf_vlm", "openvla"} <= set(BACKBONES)
    for name in ("hf_vlm", "openvla"):
        with pytest.raises(ModelNotFoundError, match="no model_path"):
            build_backbone(name)


# ------------------------------------------------------------------------------------------------ backbone
def test_sim_state_backbone_is_reproducible() -> None:
    from rsd.models.backbones import backbone_from_config, build_backbone

    obs = {"robot0_eef_pos": [0.1, 0.0, 1.0], "robot0_eef_quat": [1, 0, 0, 0], "robot0_gripper_qpos": [0.02, -0.02],
           "robot0_joint_pos": np.zeros(7), "robot0_joint_vel": np.zeros(7), "robot0_gripper_qvel": [0, 0],
           "bowl_1_pos": [0.0, 0.2, 0.9], "bowl_1_quat": [0, 0, 0, 1], "bowl_1_to_robot0_eef_pos": [0, 0, 0],
           "plate_1_pos": [0.1, 0.2, 0.9], "plate_1_quat": [0, 0, 0, 1]}
    bb = build_backbone("sim_state")
    bb.set_task_objects("Put the bowl on the plate", ["bowl_1", "plate_1"], ["bowl_1", "plate_1"])
    rng = np.random.default_rng(0)
    raw = np.stack([bb.raw_features(obs, "put the bowl on the plate")] * 5) + rng.normal(0, 0.1, (5, 174))
    bb.fit(raw)
    moved = {**obs, "bowl_1_pos": [0.05, 0.2, 0.9]}  # the bowl 5 cm along x
    h = bb.encode([obs, moved], ["put the bowl on the plate"] * 2)
    assert h.shape == (2, 4096) and torch.isfinite(h).all()
    again = backbone_from_config(json.loads(json.dumps(bb.config())))
    assert again.backbone_id == bb.backbone_id
    # the rebuilt backbone computes the same features. Batch 1 vs batch 2 of the same float32 matrix product
    # rounds differently on some CPUs (8.3e-7 seen on an Intel Xeon; values are of order 1): atol 1e-5
    one = again.encode([obs], ["put the bowl on the plate"])
    assert torch.allclose(one, h[:1], atol=1e-5, rtol=0)
    assert torch.equal(one, again.encode([obs], ["put the bowl on the plate"]))  # the same computation
    # features move with the object: the bowl's raw position features change by exactly its move, the
    # robot's do not, and the hidden state moves far beyond float rounding
    names = bb.feature_names
    delta = bb.raw_features(moved, "put the bowl on the plate") - bb.raw_features(obs, "put the bowl on the plate")
    assert delta[names.index("interest0.pos.x")] == pytest.approx(0.05)
    assert delta[names.index("interest0.rel_eef.x")] == pytest.approx(0.05)
    assert delta[names.index("interest1_minus_interest0.x")] == pytest.approx(-0.05)
    assert delta[names.index("eef_pos.x")] == 0 and delta[names.index("interest1.pos.x")] == 0
    assert float((h[1] - h[0]).abs().max()) > 0.1
    assert float((again.encode([moved], ["put the bowl on the plate"]) - h[1]).abs().max()) < 1e-5
    with pytest.raises(Exception, match="unknown task"):
        bb.encode([obs], ["another task"])


# ------------------------------------------------------------------------------------------------ cache
def test_cache_roundtrip_and_datamodule(tmp_path: Path) -> None:
    cache = make_tiny_cache(tmp_path / "cache")
    manifest, arrays = open_cache(cache)
    assert manifest["num_frames"] == 8 * 24 and manifest["num_val_episodes"] == 2
    assert isinstance(arrays["hidden"], np.memmap)
    dm = FeatureCacheDataModule(str(cache), batch_size=16, tokenizer_identity=TOKENIZER_ID, backbone=BACKBONE)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["hidden"].dtype == torch.float32 and batch["hidden"].shape == (16, D)
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (16, 8, 128)
    assert batch["targets"].shape == (16, 3, 128) and batch["actions"].shape == (16, 8, 7)
    idx = batch["index"].numpy()
    assert np.array_equal(batch["tokens"].numpy(), arrays["tokens"][idx].astype(np.int64))
    assert (np.asarray(arrays["split"])[idx] == 0).all()
    val_rows = np.concatenate([b["index"].numpy() for b in dm.val_dataloader()])
    assert (np.asarray(arrays["split"])[val_rows] == 1).all() and len(val_rows) == 2 * 24
    assert dm.cache_identity()["tokenizer"] == TOKENIZER_ID


def test_cache_mismatches_are_refused(tmp_path: Path) -> None:
    cache = make_tiny_cache(tmp_path / "cache")
    # writing another tokenizer's (or backbone's) cache into the folder
    with pytest.raises(CacheMismatchError, match="tokenizer"):
        make_tiny_cache(cache, tokenizer="rfsq-other")
    with pytest.raises(CacheMismatchError, match="backbone_id"):
        make_tiny_cache(cache, backbone={"name": "sim_state", "hidden_dim": D, "seed": 7})
    # a datamodule told about another tokenizer / backbone
    for kwargs, match in (({"tokenizer_identity": "rfsq-other"}, "tokenizer"),
                          ({"backbone": {"name": "sim_state", "hidden_dim": 128}}, "hidden_dim"),
                          ({"suite": "libero_goal"}, "suite")):
        dm = FeatureCacheDataModule(str(cache), **kwargs)
        with pytest.raises(CacheMismatchError, match=match):
            dm.setup("fit")
    # missing cache without building; distill targets without their file; corrupt arrays
    with pytest.raises(CacheError, match="no feature cache"):
        FeatureCacheDataModule(str(tmp_path / "none")).prepare_data()
    with pytest.raises(CacheError, match="distill_tokens.npy"):
        FeatureCacheDataModule(str(cache), targets="distill").setup("fit")
    np.save(cache / "tokens.npy", np.zeros((5, 8, 128), np.uint8))
    with pytest.raises(CacheError, match="tokens.npy has shape"):
        FeatureCacheDataModule(str(cache)).setup("fit")
    (cache / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="corrupt"):
        read_manifest(cache)


def test_distill_targets(tmp_path: Path) -> None:
    cache = make_tiny_cache(tmp_path / "cache")
    n = read_manifest(cache)["num_frames"]
    np.save(cache / "distill_tokens.npy", np.full((n, 3, 128), 5, np.uint8))
    (cache / "distill_tokens.json").write_text(json.dumps({"main": {"path": "/x/main_decoder.pt", "sha256": "ab"}}))
    dm = FeatureCacheDataModule(str(cache), batch_size=8, targets="distill")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert (batch["targets"] == 5).all()
    assert not (batch["tokens"][:, :3] == 5).all()  # the demos' tokens stay available for val/gt_accuracy
    identity = dm.cache_identity()  # what the exported draft records: which main model it imitates
    assert identity["targets"] == "distill" and identity["distill_source"]["path"] == "/x/main_decoder.pt"


# ------------------------------------------------------------------------------------------------ training
def test_fast_dev_run_draft_proj_and_export(tmp_path: Path) -> None:
    cache = make_tiny_cache(tmp_path / "cache")
    cfg = _compose(_train_overrides(tmp_path, cache, "+trainer.fast_dev_run=true"))
    metrics = _train(cfg)
    assert "val/accuracy" in metrics and "val/exact_L0" in metrics and "train/token_acc_L2" in metrics
    assert float(metrics["val/gt_accuracy"]) == pytest.approx(float(metrics["val/accuracy"]))  # targets = demos
    out = Path(cfg.paths.output_dir) / "best_draft_with_projection.pt"
    assert out.is_file()
    model, info = load_draft_checkpoint(out)
    assert info["format"] == "rsd" and info["config_source"] == "file"
    assert info["model_config"]["input_dim"] == D and info["model_config"]["hidden_dim"] == 64
    assert info["cache_manifest"]["tokenizer"] == TOKENIZER_ID
    assert info["cache_manifest"]["backbone_id"] == requested_backbone_id(BACKBONE)
    assert model(torch.zeros(2, D)).shape == (2, 3, 128, 7)
    # a path resolves to itself; the inspect CLI prints what the guide checks
    assert resolve_draft_checkpoint(str(out)) == out
    assert checkpoint_cli(["inspect", str(out)]) == 0


class FirstWeights(L.Callback):
    """Saves the weights, epoch and step the first training batch starts from (after any resume)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if not self.done:
            self.done = True
            torch.save({"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                        "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()}},
                       self.path)


def _first_weights(path: Path) -> list[str]:
    return [f"+callbacks.first_weights._target_={__name__}.FirstWeights", f"+callbacks.first_weights.path={path}"]


def _csv_epochs(run: Path, metric: str) -> list[int]:
    import pandas as pd

    rows = pd.read_csv(run / "csv" / "metrics.csv")
    return sorted(int(e) for e in rows.loc[rows[metric].notna(), "epoch"])


def test_train_checkpoint_export_and_resume(tmp_path: Path) -> None:
    cache = make_tiny_cache(tmp_path / "cache")
    cfg = _compose(_train_overrides(tmp_path, cache, "trainer.max_epochs=2", "model.lr=3e-3"))
    _train(cfg)
    run = Path(cfg.paths.output_dir)
    assert (run / "checkpoints/last.ckpt").is_file()
    model, info = load_draft_checkpoint(run / "best_draft_with_projection.pt")
    best = torch.load(next((run / "checkpoints").glob("epoch_*.ckpt")), weights_only=False)
    assert abs(info["val_accuracy"] - float(best["callbacks"][next(k for k in best["callbacks"]
                                                                 if "ModelCheckpoint" in k)]["best_model_score"])) < 1e-6
    state = {k[len("model."):]: v for k, v in best["state_dict"].items() if k.startswith("model.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # the optimizer state loads into a plain AdamW over the model's parameters (original usage)
    opt = torch.optim.AdamW(model.parameters())
    opt.load_state_dict(info["optimizer_state_dict"])
    assert _csv_epochs(run, "val/accuracy") == [0, 1]
    last = torch.load(run / "checkpoints/last.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (1, 10)  # 144 frames / batch 32 = 5 steps per epoch
    # ckpt_path=auto resumes from r1's last.ckpt and continues to epoch 3
    cfg2 = _compose(_train_overrides(tmp_path, cache, "trainer.max_epochs=3", "ckpt_path=auto",
                                     *_first_weights(tmp_path / "first.pt"), run="r2"))
    _train(cfg2)
    r2 = tmp_path / "logs/draft_proj_gt/runs/r2"
    first = torch.load(tmp_path / "first.pt", weights_only=True)
    # the resumed run starts where the checkpoint stopped: its epoch, its step, its weights
    assert (first["epoch"], first["global_step"]) == (2, 10)
    assert set(first["state_dict"]) == set(last["state_dict"])
    assert all(torch.equal(first["state_dict"][k], v) for k, v in last["state_dict"].items())
    # and trains only the epochs after it (a run from scratch would log epochs 0, 1, 2)
    assert _csv_epochs(r2, "val/accuracy") == [2]
    resumed = torch.load(r2 / "checkpoints/last.ckpt", weights_only=False)
    assert (resumed["epoch"], resumed["global_step"]) == (2, 15)


def test_draft_learns_a_learnable_cache(tmp_path: Path) -> None:
    """The draft LightningModule learns: on a cache whose tokens are a fixed function of the hidden state,
    validation accuracy ends far above what no learning gives (the most frequent token of each position)."""
    cache = make_tiny_cache(tmp_path / "cache", n_train=12, n_val=4, classes=6)
    _, arrays = open_cache(cache)
    split = np.asarray(arrays["split"])
    tokens = np.asarray(arrays["tokens"])[:, :3].astype(np.int64)  # the coarse layers L0..L2
    train_tok, val_tok = tokens[split == 0], tokens[split == 1]
    counts = np.stack([(train_tok == v).sum(0) for v in range(7)])  # [7, 3, 128]
    majority = (val_tok == counts.argmax(0)).mean()  # the best input-independent guess, learnt from train
    cfg = _compose(_train_overrides(tmp_path, cache, "trainer.max_epochs=5", "model.lr=3e-3",
                                    "model.net.dropout=0.0", "callbacks.model_checkpoint=null"))
    metrics = _train(cfg)
    acc = float(metrics["val/accuracy"])
    assert majority < 0.5 and acc > majority + 0.3, (acc, majority)


def test_datamodule_rejects_wrong_input_dim(tmp_path: Path) -> None:
    cache = make_tiny_cache(tmp_path / "cache")
    cfg = _compose(_train_overrides(tmp_path, cache, "+trainer.fast_dev_run=true", "model.net.input_dim=32"))
    with pytest.raises(ValueError, match="input_dim"):
        _train(cfg)


# ------------------------------------------------------------------------------------------------ checkpoints
def _original_file(path: Path, **model_kwargs) -> tuple[Path, RFSQDraftModelWithProjection]:
    model = RFSQDraftModelWithProjection(**model_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, model.input_dim)).sum().backward()
    opt.step()
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "epoch": 7, "val_accuracy": 0.5123}, path)
    return path, model


ORIGINAL_PARAMS = Path(__file__).parent / "fixtures" / "original_draft_params.json"


def _file_from_param_list(path: Path) -> dict[str, torch.Tensor]:
    """An original-project draft file built from the committed parameter list (not from this package's
    class): random tensors of the listed names and shapes, an AdamW state over them, epoch, val_accuracy."""
    g = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=g) * 0.02 for name, shape in json.loads(ORIGINAL_PARAMS.read_text())
             ["params"]}
    params = [torch.nn.Parameter(t.clone()) for t in state.values()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sum(p.sum() for p in params).backward()
    opt.step()
    torch.save({"model_state_dict": state, "optimizer_state_dict": opt.state_dict(), "epoch": 7,
                "val_accuracy": 0.5123}, path)
    return state


def test_load_original_format(tmp_path: Path, capsys) -> None:
    path = tmp_path / "best_draft_with_projection.pt"
    listed = json.loads(ORIGINAL_PARAMS.read_text())["params"]
    state = _file_from_param_list(path)
    model, info = load_draft_checkpoint(path)
    assert info["format"] == "original" and info["config_source"] == "inferred"
    assert info["epoch"] == 7 and abs(info["val_accuracy"] - 0.5123) < 1e-9
    assert info["model_config"]["input_dim"] == 4096 and info["model_config"]["hidden_dim"] == 512
    # the model has exactly the original's parameters, in the original's order, and holds the file's values
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == listed
    assert info["num_parameters"] == sum(math.prod(shape) for _, shape in listed)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # the optimizer state loads into a plain AdamW over the model's parameters (the original's usage)
    torch.optim.AdamW(model.parameters()).load_state_dict(info["optimizer_state_dict"])
    x = torch.randn(3, 4096)
    out = model(x)
    assert out.shape == (3, 3, 128, 7) and torch.equal(out, model(x))  # eval mode: no dropout
    ref = RFSQDraftModelWithProjection()
    ref.load_state_dict(state)
    assert torch.equal(out, ref.eval()(x))  # the same weights in the same class: the same computation
    out = inspect_checkpoint(str(path))
    assert out["has_input_projection"] and out["input_projection.weight"] == [512, 4096]
    assert checkpoint_cli(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "val_accuracy: 0.5123" in text and "input_projection.weight: present, shape (512, 4096)" in text
    # another width, inferred from the shapes alone
    path2, _ = _original_file(tmp_path / "small.pt", input_dim=96, hidden_dim=128, feedforward_dim=256)
    _, info2 = load_draft_checkpoint(path2)
    assert (info2["model_config"]["input_dim"], info2["model_config"]["hidden_dim"]) == (96, 128)


class _Marker:
    """Unpickling this object runs code: it writes ``path`` (how a crafted checkpoint would act)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').write('unpickled')",)


def test_checkpoints_holding_code_are_refused_unless_trusted(tmp_path: Path, capsys) -> None:
    from rsd.models.main_decoder import (
        MainDecoderCheckpointError,
        RFSQMainDecoder,
        load_main_decoder,
        save_main_decoder,
    )
    from rsd.policies.engine_policy import find_main_decoder

    marker = tmp_path / "marker.txt"
    # a draft file (original format) with one extra entry whose unpickling would run code
    draft_path, _ = _original_file(tmp_path / "draft.pt", input_dim=32, hidden_dim=32, feedforward_dim=32)
    payload = torch.load(draft_path, weights_only=True)
    torch.save({**payload, "args": _Marker(marker)}, draft_path)
    # a main decoder export with the same, in the place checkpoint discovery looks
    identity = {"backbone_id": "bb", "tokenizer": "tok", "suite": "libero_spatial"}
    logs = tmp_path / "logs"
    main_path = save_main_decoder(RFSQMainDecoder(input_dim=32, d_model=32, num_blocks=1, num_heads=2, ff_dim=32),
                                  logs / "main_head/runs/x/main_decoder.pt", data=identity)
    payload = torch.load(main_path, weights_only=True)
    torch.save({**payload, "note": _Marker(marker)}, main_path)

    with pytest.raises(DraftCheckpointError, match="policy.trust_checkpoints=true.*--trust"):
        load_draft_checkpoint(draft_path)
    with pytest.raises(MainDecoderCheckpointError, match="policy.trust_checkpoints=true"):
        load_main_decoder(main_path)
    with pytest.raises(FileNotFoundError, match="holds Python objects"):  # skipped, never unpickled
        find_main_decoder(str(logs), identity)
    assert checkpoint_cli(["inspect", str(draft_path)]) == 1
    assert "--trust" in capsys.readouterr().err
    assert not marker.exists()  # nothing ran
    # the explicit opt-ins load them (and so run the file's code)
    model, info = load_draft_checkpoint(draft_path, trust=True)
    assert marker.read_text() == "unpickled" and info["epoch"] == 7
    marker.unlink()
    assert load_main_decoder(main_path, trust=True).config["d_model"] == 32 and marker.exists()
    marker.unlink()
    assert checkpoint_cli(["inspect", str(draft_path), "--trust"]) == 0 and marker.exists()


def test_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(DraftCheckpointError, match="not found"):
        load_draft_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(DraftCheckpointError, match="names no file here"):
        resolve_draft_checkpoint("best")  # the one rule for ckpt=best lives in rsd.policies.lineage
    path, _ = _original_file(tmp_path / "good.pt", input_dim=64, hidden_dim=64, feedforward_dim=64)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DraftCheckpointError, match="truncated or corrupt"):
        load_draft_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(DraftCheckpointError, match="truncated or corrupt"):
        load_draft_checkpoint(garbage)
    ckpt = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "val_accuracy"}, tmp_path / "nokey.pt")
    with pytest.raises(DraftCheckpointError, match=r"missing keys \['val_accuracy'\]"):
        load_draft_checkpoint(tmp_path / "nokey.pt")
    state = dict(ckpt["model_state_dict"])
    state["decoder.output_norm.weight"] = torch.ones(32)
    torch.save({**ckpt, "model_state_dict": state}, tmp_path / "shape.pt")
    with pytest.raises(DraftCheckpointError, match="does not match"):
        load_draft_checkpoint(tmp_path / "shape.pt")
    state = {k: v for k, v in ckpt["model_state_dict"].items() if not k.startswith("classification_heads.2")}
    state["extra.weight"] = torch.zeros(1)
    torch.save({**ckpt, "model_state_dict": state, "config": {"model": {"input_dim": 64, "hidden_dim": 64,
                                                                        "feedforward_dim": 64}}},
               tmp_path / "keys.pt")
    with pytest.raises(DraftCheckpointError, match="missing .*unexpected"):
        load_draft_checkpoint(tmp_path / "keys.pt")
    assert checkpoint_cli(["inspect", str(tmp_path / "missing.pt")]) == 1


# ------------------------------------------------------------------------------------------------ simulator
@pytest.mark.sim
def test_build_cache_from_demo_file(tmp_path: Path) -> None:
    """Expert demo (official HDF5 schema) -> cache; evaluation's rebuilt backbone reproduces the features."""
    pytest.importorskip("libero")

    from rsd.data.cache import build_cache
    from rsd.data.chunks import action_chunks
    from rsd.data.record import run_expert_episode
    from rsd.envs.libero_env import get_init_states, get_task, make_env
    from rsd.models.backbones import backbone_from_config, backbone_from_manifest
    from rsd.tokenizer.layout import codes_to_layers
    from rsd.tokenizer.rfsq import RFSQTokenizer

    suite = "libero_spatial"
    task = get_task(suite, 0)
    env = make_env(task)
    try:
        ep = run_expert_episode(env, task, get_init_states(suite, 0)[0], init_state_index=0, max_steps=16)
        assert ep.error is None and ep.num_steps == 16
        from rsd.data.libero_hdf5 import Episode, demo_path, write_demo_file

        # demo_0.. are written in order; the first validation key of task 0 is demo_16 -> 17 copies
        n_demos = max(int(k.rsplit("_", 1)[1]) for k, _ in _episode_keys(1, 1)) + 1
        episodes = [Episode(actions=ep.actions, states=ep.states, obs=ep.obs, robot_states=ep.robot_states,
                            rewards=ep.rewards, dones=ep.dones) for _ in range(n_demos)]
        write_demo_file(demo_path(tmp_path / "demos", suite, task.name), task, episodes)
        tok = RFSQTokenizer()
        tok.normalizer.fit(ep.actions)
        tok_path = tok.save(tmp_path / "rfsq.pt")
        cache = build_cache(suite, tmp_path / "cache", tok_path, tmp_path / "demos",
                            backbone_from_config({"name": "sim_state"}), progress=False)
        manifest, arrays = open_cache(cache)
        assert manifest["num_frames"] == 16 * n_demos and manifest["num_val_episodes"] == 1
        assert manifest["tokenizer"]["identity"] == tok.identity()
        assert manifest["tasks"][0]["interest"] == ["akita_black_bowl_1", "plate_1"]
        # the builder encodes all 17 x 16 chunks in one batch (batch_size 2048): the same batch here is the
        # same computation (a batch of 16 could round the encoder differently and flip a token at a boundary)
        chunks = torch.from_numpy(np.concatenate([action_chunks(ep.actions)] * n_demos))
        expected = codes_to_layers(tok.encode(chunks)).numpy()
        assert np.array_equal(arrays["tokens"], expected)
        assert (arrays["tokens"][:16] == codes_to_layers(tok.encode(chunks[:16])).numpy()).mean() > 0.99
        # evaluation rebuilds the exact transform from the manifest
        bb = backbone_from_manifest(manifest)
        obs = env.regenerate_obs_from_state(ep.states[5])
        h = bb.encode([obs], [task.language]).numpy()[0]
        assert np.allclose(h.astype(np.float16), arrays["hidden"][5], atol=2e-3)
        # a second build with another tokenizer into the same folder is refused
        tok2 = RFSQTokenizer()
        tok2.normalizer.fit(ep.actions * 2)
        with pytest.raises(CacheMismatchError, match="tokenizer"):
            build_cache(suite, cache, tok2.save(tmp_path / "rfsq2.pt"), tmp_path / "demos",
                        backbone_from_config({"name": "sim_state"}), progress=False)
    finally:
        env.close()
