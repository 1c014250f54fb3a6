"""RFSQMainDecoder (shapes, one-call prefix scoring == KV-cached steps), export/load, LightningModule, config."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from margins import LOGIT_MARGIN, top2_gap
from torch.utils.data import DataLoader, Dataset

from rsd import PROJECT_ROOT
from rsd.models.lit_main import ExportMainDecoder, MainDecoderLitModule
from rsd.models.main_decoder import (
    MainDecoderCheckpointError,
    RFSQMainDecoder,
    load_main_decoder,
    save_main_decoder,
)

TINY = dict(input_dim=32, d_model=64, num_blocks=2, num_heads=4, ff_dim=128)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _model(seed: int = 0, **kw) -> RFSQMainDecoder:
    torch.manual_seed(seed)
    return RFSQMainDecoder(**{**TINY, **kw}).eval()


def _data(b: int = 3, d: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randint(0, 7, (b, 8, 128), generator=g)


def test_shapes_and_input_checks():
    m = _model()
    h, t = _data()
    assert m(h).shape == (3, 1, 128, 7)
    assert m(h, t[:, :0]).shape == (3, 1, 128, 7)
    assert m(h, t[:, :3]).shape == (3, 4, 128, 7)
    assert m(h, t[:, :7]).shape == (3, 8, 128, 7)  # teacher forcing: all 8 layers in one call
    with pytest.raises(ValueError, match="nothing to predict"):
        m(h, t)
    with pytest.raises(ValueError, match="hidden"):
        m(torch.randn(3, 16))
    with pytest.raises(ValueError, match="token layers"):
        m(h, t[:, :2, :64])
    with pytest.raises(ValueError, match="batch"):
        m(h[:2], t[:, :2])
    default = RFSQMainDecoder()
    assert default.input_dim == 4096 and 20e6 < default.num_parameters() < 30e6


def test_prefix_scoring_in_one_call_equals_kv_cached_steps():
    m = _model()
    h, t = _data(b=4)
    with torch.no_grad():
        full = m(h, t[:, :7])
        cache = m.new_cache(4)
        steps = [m.score(h, None, cache)]
        assert cache.length == 1
        for k in range(7):
            steps.append(m.extend(t[:, k:k + 1], cache))
        assert cache.length == 8
        stepwise = torch.cat(steps, dim=1)
        assert torch.allclose(full, stepwise, atol=1e-5)
        # greedy tokens agree wherever the choice is not a near-tie (random weights; margins.py)
        sure = top2_gap(full) > LOGIT_MARGIN
        assert sure.float().mean() > 0.99
        assert torch.equal(full.argmax(-1)[sure], stepwise.argmax(-1)[sure])
        # verification-style use: score a drafted prefix, drop rejected layers, continue
        for k in (1, 3, 5):
            cache = m.new_cache(4)
            scored = m.score(h, t[:, :k], cache)
            assert torch.allclose(scored, full[:, : k + 1], atol=1e-5)
            cache.truncate(2)
            rest = m.extend(t[:, 1:7], cache)  # several layers at once after a cached prefix
            assert torch.allclose(rest, full[:, 2:8], atol=1e-5)
        with pytest.raises(ValueError, match="empty cache"):
            m.score(h, None, cache)
        with pytest.raises(ValueError, match="exceed"):
            m.extend(t[:, :1], cache)
        with pytest.raises(ValueError, match="started"):
            m.extend(t[:, :1], m.new_cache(4))
    # prefix scoring does not look ahead: layer k's logits ignore layers >= k
    t2 = t.clone()
    t2[:, 4:] = (t2[:, 4:] + 1) % 7
    with torch.no_grad():
        assert torch.allclose(m(h, t2[:, :7])[:, :5], full[:, :5], atol=1e-5)


def test_save_load_roundtrip_and_errors(tmp_path: Path):
    m = _model()
    h, t = _data()
    path = save_main_decoder(m, tmp_path / "main_decoder.pt", metrics={"val/accuracy": 0.5})
    loaded = load_main_decoder(path)
    assert loaded.config == m.config and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(h, t[:, :7]), m(h, t[:, :7]))
    with pytest.raises(FileNotFoundError, match="experiment=main_head"):
        load_main_decoder(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(MainDecoderCheckpointError, match="truncated or corrupt"):
        load_main_decoder(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model_state_dict": {}, "epoch": 1}, foreign)
    with pytest.raises(MainDecoderCheckpointError, match="not a main decoder file"):
        load_main_decoder(foreign)
    payload = torch.load(path, weights_only=True)
    payload["config"]["d_model"] = 32
    payload["config"]["num_heads"] = 4
    bad = tmp_path / "mismatch.pt"
    torch.save(payload, bad)
    with pytest.raises(MainDecoderCheckpointError, match="do not match"):
        load_main_decoder(bad)


# ---------------------------------------------------------------------- LightningModule
class _TinyCache(Dataset):
    """Batches like FeatureCacheDataModule's: tokens a deterministic function of the hidden state's class."""

    def __init__(self, n: int, d: int, seed: int) -> None:
        g = torch.Generator().manual_seed(0)
        protos = torch.randn(4, d, generator=g) * 2
        tables = torch.randint(0, 7, (4, 8, 128), generator=g)
        g = torch.Generator().manual_seed(seed)
        cls = torch.randint(0, 4, (n,), generator=g)
        self.hidden = protos[cls] + 0.1 * torch.randn(n, d, generator=g)
        self.tokens = tables[cls]

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"hidden": self.hidden[i], "tokens": self.tokens[i], "actions": torch.zeros(8, 7)}


class TinyCacheDataModule(L.LightningDataModule):
    def __init__(self, hidden_dim: int = 32, batch_size: int = 16, **_: object) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_TinyCache(64, self.hidden_dim, 1), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_TinyCache(32, self.hidden_dim, 2), batch_size=self.batch_size)

    def cache_identity(self) -> dict:
        return {"backbone_name": "tiny", "suite": "synthetic", "hidden_dim": self.hidden_dim}


def test_lit_module_fit_metrics_and_export(tmp_path: Path):
    lit = MainDecoderLitModule(net=TINY, lr=3e-3, warmup_steps=5)
    export = ExportMainDecoder(output_dir=str(tmp_path), copy_to=str(tmp_path / "models" / "main_head_{backbone}_{suite}.pt"))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/accuracy", mode="max")
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ckpt, export], default_root_dir=tmp_path)
    trainer.fit(lit, datamodule=TinyCacheDataModule())
    m = trainer.callback_metrics
    for k in range(8):
        assert f"val/acc_L{k}" in m and f"val/exact_L{k}" in m and f"train/acc_L{k}" in m
    assert "val/exact_all" in m and "train/loss" in m and "val/loss" in m
    mean = torch.stack([m[f"val/acc_L{k}"] for k in range(8)]).mean()
    assert float(m["val/accuracy"]) == pytest.approx(float(mean), abs=1e-6)
    assert float(m["val/accuracy"]) > 0.3  # learning (chance is 1/7)
    out = tmp_path / "main_decoder.pt"
    assert out.is_file() and (tmp_path / "models" / "main_head_tiny_synthetic.pt").is_file()
    loaded = load_main_decoder(out)
    payload = torch.load(out, weights_only=True)
    assert payload["data"]["suite"] == "synthetic" and "val/accuracy" in payload["metrics"]
    h, t = _data()
    with torch.no_grad():
        assert torch.allclose(loaded(h, t[:, :7]), lit.decoder.eval()(h, t[:, :7]))
    # a Lightning checkpoint of this module loads too
    assert load_main_decoder(ckpt.best_model_path).config == loaded.config


def test_trained_layers_trains_only_the_first_layers_and_the_engine_keeps_to_them(tmp_path: Path):
    """net.trained_layers=2: the loss and metrics cover layers 0-1 only (2 depth positions per sample), the
    export records it, the engine refuses a depth above it and greedy tokens leave the other layers at the
    centre level."""
    import numpy as np

    from rsd.engine.rsd_engine import RSDInferenceEngine, greedy_tokens

    with pytest.raises(ValueError, match="trained_layers"):
        RFSQMainDecoder(**TINY, trained_layers=9)
    lit = MainDecoderLitModule(net={**TINY, "trained_layers": 2}, lr=3e-3, warmup_steps=5)
    export = ExportMainDecoder(output_dir=str(tmp_path))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[export],
                        default_root_dir=tmp_path)
    untouched = lit.decoder.head_weight[2:].detach().clone()
    trainer.fit(lit, datamodule=TinyCacheDataModule())
    m = trainer.callback_metrics
    assert "val/acc_L1" in m and "val/acc_L2" not in m
    assert float(m["val/accuracy"]) == pytest.approx(float((m["val/acc_L0"] + m["val/acc_L1"]) / 2), abs=1e-6)
    # the heads of layers 2..7 got no gradient (weight decay still shrinks them: AdamW decays every parameter
    # of its group, 2 epochs at lr 3e-3 and 0.05 keep them within 1 %)
    assert torch.allclose(lit.decoder.head_weight[2:].detach(), untouched, rtol=1e-2, atol=0)
    loaded = load_main_decoder(tmp_path / "main_decoder.pt")
    assert loaded.trained_layers == 2 and loaded.config["trained_layers"] == 2
    with pytest.raises(ValueError, match="trained for layers 0..1"):
        RSDInferenceEngine(loaded, mode="baseline")  # depth null = all 8
    with pytest.raises(ValueError, match="use depth <= 2"):
        RSDInferenceEngine(loaded, mode="baseline", depth=3)
    RSDInferenceEngine(loaded, mode="baseline", depth=2)
    h, _ = _data(b=5)
    tokens = greedy_tokens(loaded, h.numpy(), batch_size=2)
    assert tokens.shape == (5, 8, 128) and np.all(tokens[:, 2:] == 3)  # centre level of 7
    assert not np.all(tokens[:, :2] == 3)
    assert _model().trained_layers == 8  # the default: all layers (files without the key load as before)


def test_lit_module_rejects_wrong_hidden_dim():
    lit = MainDecoderLitModule(net=TINY)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="input_dim=64"):
        trainer.fit(lit, datamodule=TinyCacheDataModule(hidden_dim=64))


# ---------------------------------------------------------------------- Hydra config + train.py
def _compose(tmp_path: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import rsd.utils.config  # noqa: F401 - registers ${rsd_root:}

    conf = PROJECT_ROOT / "conf"
    if not (conf / "data" / "feature_cache.yaml").is_file():  # written by another module; stand in for it
        conf = tmp_path / "conf"
        shutil.copytree(PROJECT_ROOT / "conf", conf)
        (conf / "data" / "feature_cache.yaml").write_text("_target_: x.FeatureCacheDataModule\nsuite: s\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=main_head", *overrides])


def test_experiment_main_head_trains_with_train_py(tmp_path: Path):
    from omegaconf import OmegaConf, open_dict

    cfg = _compose(tmp_path, [
        "logger=csv", f"paths.output_dir={tmp_path}", "trainer=cpu", "trainer.max_epochs=2",
        "model.net.input_dim=32", "model.net.d_model=64", "model.net.num_blocks=2",
        "model.net.num_heads=4", "model.net.ff_dim=128", "model.warmup_steps=2",
        "~callbacks.progress_bar", "prepare.until=null",  # a stand-in cache below: no pipeline steps
    ])
    assert cfg.task_name == "main_head"
    assert cfg.model._target_ == "rsd.models.lit_main.MainDecoderLitModule"
    assert cfg.callbacks.export_main._target_ == "rsd.models.lit_main.ExportMainDecoder"
    assert cfg.callbacks.model_checkpoint.monitor == "val/accuracy"
    assert cfg.data._target_.endswith("FeatureCacheDataModule")
    full = OmegaConf.load(PROJECT_ROOT / "conf" / "model" / "main_head.yaml")
    assert full.net.d_model == 512 and full.net.num_blocks == 6
    with open_dict(cfg):  # the real cache needs LIBERO demos; train on a tiny stand-in with the same batches
        cfg.data = OmegaConf.create({"_target_": f"{__name__}.TinyCacheDataModule", "hidden_dim": 32})
    import rsd.train as entry
    metrics = entry.train(cfg)
    assert "val/accuracy" in metrics and "val/acc_L7" in metrics
    assert load_main_decoder(tmp_path / "main_decoder.pt").config["d_model"] == 64


def test_training_cost_benchmark_runs_and_reports_each_layer_count(tmp_path: Path):
    """scripts/benchmark_main_training.py: one row per trained-layer count, ratios from its own columns."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "benchmark_main_training.py"),
                           "--layers", "2", "1", "--steps", "1", "--batch-size", "4", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["trained_layers"] for r in rows] == [2, 1]
    assert rows[1]["ratio_to_first"] == pytest.approx(rows[0]["ms_per_step"] / rows[1]["ms_per_step"])
    assert "| 1 |" in proc.stdout
