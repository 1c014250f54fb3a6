"""The RFSQ action tokenizer: exact decoding from indices, layout, normalization, files, training entry."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from rsd.data.action_chunks import ActionChunkDataModule, DemosNotFoundError
from rsd.data.chunks import action_chunks
from rsd.tokenizer import ActionNormalizer, ResidualFSQ, RFSQTokenizer, TokenizerCheckpointError
from rsd.utils.config import CONFIG_DIR


def synth_episode(rng: np.random.Generator, length: int) -> np.ndarray:
    """Smooth arm deltas (sums of sinusoids + a little noise) and a -1/+1 gripper that closes once."""
    t = np.arange(length)[:, None]
    arm = np.zeros((length, 6))
    for _ in range(3):
        f, ph, a = rng.uniform(0.01, 0.08, 6), rng.uniform(0, 6.3, 6), rng.uniform(0.1, 0.5, 6)
        arm += a * np.sin(2 * np.pi * f * t + ph)
    arm = np.clip(arm + 0.01 * rng.standard_normal((length, 6)), -1, 1)
    grip = -np.ones((length, 1))
    grip[rng.integers(length // 4, length // 2): rng.integers(3 * length // 4, length)] = 1
    return np.concatenate([arm, grip], 1).astype(np.float32)


def synth_chunks(n_episodes: int = 40, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.concatenate([action_chunks(synth_episode(rng, int(rng.integers(60, 120))))
                                            for _ in range(n_episodes)]))


def write_demo_folder(root: Path, suite: str = "libero_spatial", n_tasks: int = 2, n_demos: int = 6) -> Path:
    """A tiny folder of LIBERO-schema demo files (data/demo_i/actions, states, obs...)."""
    rng = np.random.default_rng(1)
    folder = root / suite
    folder.mkdir(parents=True)
    for k in range(n_tasks):
        with h5py.File(folder / f"synthetic_task_{k}_demo.hdf5", "w") as f:
            data = f.create_group("data")
            data.attrs["task_id"] = k
            for i in range(n_demos):
                actions = synth_episode(rng, int(rng.integers(40, 70)))
                g = data.create_group(f"demo_{i}")
                g.create_dataset("actions", data=actions.astype(np.float64))
                g.create_dataset("states", data=np.zeros((len(actions), 92)))
                g.create_dataset("obs/robot0_eef_pos", data=np.zeros((len(actions), 3)))
                g.attrs["num_samples"] = len(actions)
    return root


def fitted_tokenizer(chunks: torch.Tensor, hidden_dim: int = 32) -> RFSQTokenizer:
    tok = RFSQTokenizer(hidden_dim=hidden_dim, mlp_depth=1)
    tok.normalizer.fit(chunks[:, 0])
    tok.init_from_data(tok.normalizer.normalize(chunks))
    return tok.eval()


# ---------------------------------------------------------------------------------------- quantizer
def test_residual_fsq_codes_bounds_and_exact_dequantize():
    q = ResidualFSQ(num_layers=8, num_levels=7)
    z = torch.rand(512, 16) * 2 - 1
    z[0], z[1] = 1.0, -1.0
    z.requires_grad_(True)
    z_q, codes = q.quantize(z)
    assert codes.shape == (512, 16, 8) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) <= 6
    assert torch.equal(z_q, q.dequantize(codes))
    for n in range(1, 9):
        z_n, _ = q.quantize(z, n)
        assert torch.equal(z_n, q.dequantize(codes, n))
        bound = 7.0 ** -(n - 1) / 6 + 1e-6
        assert (z_n - z).abs().max().item() <= bound
    # every fine layer is used (a per-token normalized quantizer would leave them at the centre level)
    for k in range(1, 8):
        assert torch.bincount(codes[..., k].flatten(), minlength=7).min() > 0
    # straight-through gradient
    z_q.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))
    # per-sample prefixes (quantizer dropout) equal the per-n decode
    n = torch.randint(1, 9, (512,))
    z_mix, _ = q.quantize(z.detach(), n)
    for i in range(0, 512, 37):
        assert torch.equal(z_mix[i], q.dequantize(codes[i: i + 1], int(n[i]))[0])


# ---------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_shapes_dtypes_and_decode_equals_forward_exactly():
    chunks = synth_chunks()
    tok = fitted_tokenizer(chunks)
    x = chunks[:64]
    codes = tok.encode(x)
    assert codes.shape == (64, 8, 16, 8) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) <= 6
    with torch.no_grad():
        for n in [None, 1, 3, 8]:
            recon, z_q, fcodes = tok(tok.normalizer.normalize(x), n)
            assert recon.shape == (64, 8, 7) and z_q.shape == (64, 8, 16)
            assert torch.equal(fcodes, codes)
            assert torch.equal(tok.quantizer.dequantize(codes, n), z_q)
            assert torch.equal(tok.decode_normalized(codes, n), recon)
            assert torch.equal(tok.decode(codes, n), tok.normalizer.unnormalize(recon))
    # codes survive uint8 storage (the feature cache's dtype)
    assert torch.equal(tok.decode(codes.to(torch.uint8)), tok.decode(codes))
    raw = tok.decode(codes)
    assert raw.shape == (64, 8, 7) and raw.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[B, 8, 7\]"):
        tok.encode(torch.zeros(2, 8, 6))
    with pytest.raises(ValueError, match="0..6"):
        tok.decode(torch.full((1, 8, 16, 8), 7))
    with pytest.raises(ValueError, match=r"\[B, 8, 16, 8\]"):
        tok.decode(torch.zeros(1, 8, 128, dtype=torch.long))


def test_normalizer_round_trip_gripper_and_constant_dims():
    rng = np.random.default_rng(0)
    actions = rng.uniform(-0.5, 0.8, size=(5000, 7)).astype(np.float32)
    actions[:, 6] = np.where(rng.random(5000) < 0.5, -1.0, 1.0)
    actions[:, 3] = 0.25  # constant dimension
    norm = ActionNormalizer(7, skip_dims=(6,)).fit(actions)
    x = torch.from_numpy(actions)
    y = norm.normalize(x)
    assert y.min() >= -1 and y.max() <= 1
    assert torch.equal(y[:, 6], x[:, 6])  # gripper untouched
    assert torch.all(y[:, 3] == 0)
    inside = ((x >= norm.q01) & (x <= norm.q99)).all(1)
    back = norm.unnormalize(y)
    assert torch.allclose(back[inside], x[inside], atol=1e-5)
    assert torch.allclose(back[:, 3], x[:, 3])
    assert abs(float(norm.q01[0]) - np.quantile(actions[:, 0], 0.01)) < 1e-5


@pytest.fixture
def one_thread():
    """Small models train faster on one thread, and a busy shared CPU does not stall them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_coarse_prefix_error_decreases_with_layers_after_training(one_thread, tmp_path: Path) -> None:
    """The shipped RFSQLitModule (data init, quantizer dropout, range penalty, warm-up + cosine schedule)
    trained for 300 steps through Lightning: validation errors fall layer by layer, and the training improved
    the coarse 1-layer prefix over the data-initialised start (what quantizer dropout is for)."""
    import lightning as L

    from rsd.tokenizer.lit_rfsq import RFSQLitModule

    write_demo_folder(tmp_path / "demos", n_tasks=3, n_demos=20)
    dm = ActionChunkDataModule(demos_dir=str(tmp_path / "demos"), batch_size=128, val_fraction=0.2)
    L.seed_everything(0)
    lit = RFSQLitModule(net={"hidden_dim": 32, "mlp_depth": 1}, lr=1e-3, warmup_steps=20)
    trainer = L.Trainer(max_steps=300, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=1000, default_root_dir=tmp_path)
    trainer.fit(lit, datamodule=dm)
    assert trainer.global_step == 300
    # the start the module's setup() made: normalizer fitted on the training episodes, exact linear init
    start = RFSQTokenizer(hidden_dim=32, mlp_depth=1)
    start.normalizer.fit(dm.train_actions)
    start.init_from_data(start.normalizer.normalize(dm.train_chunks.float()))
    assert torch.equal(start.normalizer.q01, lit.tokenizer.normalizer.q01)
    before = start.eval().reconstruction_mse(dm.val_chunks)
    tok = lit.tokenizer.eval()
    mse = tok.reconstruction_mse(dm.val_chunks)
    assert len(mse) == 8
    for a, b in zip(mse, mse[1:], strict=False):
        assert b <= a * 1.02 + 1e-9  # each further layer lowers the error (up to 2 %: fine layers saturate)
    assert mse[0] < 5e-2 and mse[2] < 1e-2 and mse[7] < 1e-3
    assert mse[7] < mse[0] / 10
    # 1.18e-2 -> 1.03e-2 on the CPU this was written on; without quantizer dropout it stays at the start
    assert mse[0] < 0.95 * before[0], (mse[0], before[0])
    # the module's own validation metrics are these errors (float32 accumulation: rel 1e-3)
    logged = trainer.validate(lit, datamodule=dm, verbose=False)[0]
    assert [logged[f"val/mse_L{n}"] for n in range(1, 9)] == pytest.approx(mse, rel=1e-3)


# ---------------------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path: Path):
    chunks = synth_chunks(10)
    tok = fitted_tokenizer(chunks)
    path = tok.save(tmp_path / "tok" / "rfsq_x.pt", metadata={"suite": "libero_spatial", "val_mse": [1.0]})
    loaded = RFSQTokenizer.load(path)
    assert loaded.identity() == tok.identity() and loaded.identity().startswith("rfsq-")
    assert loaded.metadata["suite"] == "libero_spatial"
    assert loaded.config == tok.config
    codes = tok.encode(chunks[:16])
    assert torch.equal(loaded.encode(chunks[:16]), codes)
    assert torch.equal(loaded.decode(codes), tok.decode(codes))
    assert not loaded.training
    # the identity changes with the weights
    with torch.no_grad():
        loaded.decoder.linear.bias.add_(1e-3)
    assert loaded.identity() != tok.identity()


def test_checkpoint_errors_say_what_to_do(tmp_path: Path):
    with pytest.raises(TokenizerCheckpointError, match="not found.*python train.py experiment=rfsq"):
        RFSQTokenizer.load(tmp_path / "missing.pt")

    tok = fitted_tokenizer(synth_chunks(5))
    good = tok.save(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(TokenizerCheckpointError, match="truncated or corrupt.*python train.py experiment=rfsq"):
        RFSQTokenizer.load(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(TokenizerCheckpointError, match="truncated or corrupt"):
        RFSQTokenizer.load(garbage)

    other = tmp_path / "other_dict.pt"
    torch.save({"model_state_dict": {}}, other)
    with pytest.raises(TokenizerCheckpointError, match="not an rsd RFSQ tokenizer file"):
        RFSQTokenizer.load(other)

    # another layout (latent 32): one clear error naming the shapes and the fix
    wide = RFSQTokenizer(latent_dim=32, hidden_dim=32, mlp_depth=1)
    wide_path = wide.save(tmp_path / "wide.pt")
    with pytest.raises(TokenizerCheckpointError, match=r"latent_dim.*32.*16.*python train.py experiment=rfsq"):
        RFSQTokenizer.load(wide_path)
    assert RFSQTokenizer.load(wide_path, expect_layout=False).latent_dim == 32

    # weights whose shapes differ from the stored config
    payload = torch.load(good, weights_only=True)
    payload["config"]["hidden_dim"] = 64
    mismatched = tmp_path / "mismatched.pt"
    torch.save(payload, mismatched)
    with pytest.raises(TokenizerCheckpointError, match=r"does not match its config.*encoder.*experiment=rfsq"):
        RFSQTokenizer.load(mismatched)


# ---------------------------------------------------------------------------------------- data + training entry
def test_datamodule_splits_by_episode_and_fits_normalizer_on_train(tmp_path: Path):
    write_demo_folder(tmp_path / "demos", n_tasks=3, n_demos=10)
    dm = ActionChunkDataModule(demos_dir=str(tmp_path / "demos"), batch_size=64, val_fraction=0.3)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_keys and dm.val_keys and not set(dm.train_keys) & set(dm.val_keys)
    assert all(k.startswith("libero_spatial/") for k in dm.train_keys + dm.val_keys)
    assert len(dm.train_chunks) == len(dm.train_actions)  # one chunk per step
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (64, 8, 7) and batch.dtype == torch.float32
    assert len(dm.val_dataloader().dataset) == len(dm.val_chunks)
    stats = dm.normalizer.stats()
    assert np.allclose(stats["q01"][:6], np.quantile(dm.train_actions[:, :6], 0.01, axis=0), atol=1e-5)
    assert stats["skip_dims"] == [6]

    empty = ActionChunkDataModule(demos_dir=str(tmp_path / "none"))
    with pytest.raises(DemosNotFoundError, match="python -m rsd.prepare prepare.until=demos"):
        empty.prepare_data()


def test_experiment_rfsq_composes_and_fast_dev_run_exports_tokenizer(tmp_path: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    import rsd.utils.config  # noqa: F401  (registers resolvers)

    write_demo_folder(tmp_path / "demos", n_tasks=2, n_demos=8)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        overrides = [
            "experiment=rfsq", "logger=csv", f"paths.demos_dir={tmp_path / 'demos'}",
            f"paths.tokenizer_dir={tmp_path / 'tok'}", f"paths.output_dir={tmp_path / 'out'}",
            f"paths.log_dir={tmp_path / 'logs'}", "+trainer.fast_dev_run=true", "trainer.accelerator=cpu",
            "callbacks.progress_bar=null", "data.batch_size=64", "data.val_fraction=0.3",
            "model.net.hidden_dim=32", "prepare.until=null",
        ]
        full = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        assert full.hydra.runtime.choices["experiment"] == "rfsq"
        HydraConfig.instance().set_config(full)
        cfg = compose(config_name="train", overrides=overrides)
        assert cfg.task_name == "rfsq"
        assert cfg.callbacks.model_checkpoint.monitor == "val/mse_L8"
        assert cfg.callbacks.model_checkpoint.mode == "min"
        assert cfg.model._target_.endswith("RFSQLitModule")
        assert cfg.data._target_.endswith("ActionChunkDataModule")
        assert "export_tokenizer" in cfg.callbacks
        import rsd.train as entry
        metrics = entry.train(cfg)
    GlobalHydra.instance().clear()
    assert "val/mse_L8" in metrics and "val/mse_L1" in metrics
    out = tmp_path / "tok" / "rfsq_libero_spatial" / "rfsq.pt"
    tok = RFSQTokenizer.load(out)
    assert tok.metadata["data"]["suite"] == "libero_spatial"
    assert len(tok.metadata["val_mse_by_layers"]) == 8
    report = (tmp_path / "tok" / "rfsq_libero_spatial" / "rfsq.recon.json").read_text()
    assert tok.identity() in report
    md = (tmp_path / "tok" / "rfsq_libero_spatial" / "rfsq.recon.md").read_text()
    assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")][1:] == \
        [str(n) for n in range(1, 9)]
