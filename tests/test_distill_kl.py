"""Soft distillation targets (``python -m rsd.prepare.distill --soft``) and the KL-distilled draft (issue 13.2)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from factories import TOKENIZER_ID, D, make_tiny_cache
from hydra import compose, initialize_config_dir

from rsd.data.cache import CacheError, read_manifest
from rsd.data.cache_datamodule import FeatureCacheDataModule
from rsd.models.checkpoint import load_draft_checkpoint
from rsd.models.lit_draft import DraftLitModule, distill_kl, tempered_teacher
from rsd.models.main_decoder import RFSQMainDecoder, save_main_decoder
from rsd.prepare.distill import main as distill_cli
from rsd.prepare.distill import teacher_probs
from rsd.utils.config import CONFIG_DIR

pytestmark = pytest.mark.usefixtures("torch_one_thread")

#: float16 keeps 11 significant bits: each stored probability is within 2**-11 (relative) of the float32 one,
#: so a row sums to 1 within 2**-11 (+ float32 rounding); 1e-3 leaves twice that
SUM_TOL = 1e-3
#: float16 spacing just below 1 is 2**-11: a top-2 probability gap above 4 spacings cannot be reordered by
#: the float16 rounding, nor by float32 differences between the engine's and the teacher-forced call
PROB_MARGIN = 4 * 2.0 ** -11
DRAFT_NET = {"input_dim": D, "hidden_dim": 64, "num_heads": 4, "feedforward_dim": 128, "dropout": 0.0}


def _tiny_main(seed: int = 0, sharpen: float = 10.0) -> RFSQMainDecoder:
    """A random tiny main decoder; ``sharpen`` scales its heads so its distributions are peaked (a trained
    main model's are), giving the draft something beyond chance to imitate."""
    torch.manual_seed(seed)
    main = RFSQMainDecoder(input_dim=D, d_model=32, num_blocks=1, num_heads=4, ff_dim=64).eval()
    with torch.no_grad():
        main.head_weight.mul_(sharpen)
    return main


@pytest.fixture(scope="module")
def distilled_cache(tmp_path_factory) -> tuple[Path, Path, RFSQMainDecoder]:
    """A tiny cache with ``distill_tokens.npy`` and ``distill_probs.npy`` written by the CLI."""
    root = tmp_path_factory.mktemp("distill_kl")
    cache = make_tiny_cache(root / "cache")
    main = _tiny_main()
    main_path = save_main_decoder(main, root / "main_decoder.pt")
    assert distill_cli(["--main", str(main_path), "--cache-dir", str(cache), "--device", "cpu",
                        "--batch-size", "64", "--soft"]) == 0
    return cache, main_path, main


def test_tempered_teacher_and_kl() -> None:
    logits = torch.randn(5, 7) * 3
    p = logits.softmax(-1)
    for t in (1.0, 2.0, 4.0):  # p^(1/T) renormalized is softmax(logits / T)
        assert torch.allclose(tempered_teacher(p, t), (logits / t).softmax(-1), atol=1e-6)
        assert torch.allclose(distill_kl(p, logits, t), torch.zeros(5), atol=1e-5)
    p0 = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0]])  # float16 underflow: zeros give 0 * log 0 = 0, not nan
    assert torch.isfinite(distill_kl(p0, torch.zeros(1, 7), 2.0)).all()
    assert float(distill_kl(p0, torch.zeros(1, 7), 1.0)) == pytest.approx(np.log(7), abs=1e-5)


def test_soft_targets_file(distilled_cache) -> None:
    cache, main_path, main = distilled_cache
    n = read_manifest(cache)["num_frames"]
    probs = np.load(cache / "distill_probs.npy", mmap_mode="r")
    tokens = np.load(cache / "distill_tokens.npy", mmap_mode="r")
    assert probs.shape == (n, 3, 128, 7) and probs.dtype == np.float16
    p = torch.from_numpy(np.array(probs, dtype=np.float32))
    assert (p >= 0).all() and (p.sum(-1) - 1).abs().max() < SUM_TOL
    # argmax = the greedy tokens wherever the top-2 gap is clear of float16 / cross-call rounding
    top2 = p.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > PROB_MARGIN
    assert clear.float().mean() > 0.5, clear.float().mean()
    greedy = torch.from_numpy(np.array(tokens[:, :3])).long()
    assert torch.equal(p.argmax(-1)[clear], greedy[clear])
    # conditioned on the main model's own greedy prefix: layer k given tokens[:, :k] (float32 recomputation)
    hidden = torch.from_numpy(np.load(cache / "hidden.npy")[:16].astype(np.float32))
    ref = teacher_probs(main, hidden, greedy[:16], 3)
    assert (ref - p[:16]).abs().max() < 2.0 ** -11
    info = json.loads((cache / "distill_probs.json").read_text())
    greedy_info = json.loads((cache / "distill_tokens.json").read_text())
    assert info["main"] == greedy_info["main"] and info["main"]["path"] == str(main_path.resolve())
    assert len(info["main"]["sha256"]) == 16 and info["temperature"] == 1.0 and "greedy" in info["definition"]
    assert info["num_frames"] == n and info["shape"] == [n, 3, 128, 7]


def test_datamodule_soft_targets_and_errors(distilled_cache, tmp_path: Path) -> None:
    cache, main_path, _ = distilled_cache
    dm = FeatureCacheDataModule(str(cache), batch_size=8, targets="distill_soft")
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    rows = batch["index"].numpy()
    assert batch["soft_targets"].dtype == torch.float32 and batch["soft_targets"].shape == (8, 3, 128, 7)
    assert torch.equal(batch["targets"], torch.from_numpy(np.load(cache / "distill_tokens.npy")[rows, :3]).long())
    assert dm.cache_identity()["targets"] == "distill_soft"
    assert dm.cache_identity()["distill_source"]["path"] == str(main_path.resolve())
    greedy_only = FeatureCacheDataModule(str(cache), batch_size=4, targets="distill")
    greedy_only.setup("fit")
    assert "soft_targets" not in next(iter(greedy_only.val_dataloader()))
    # missing file / sidecar, a file made for another cache: clear errors
    other = make_tiny_cache(tmp_path / "other", tokenizer="rfsq-other")  # same frame count, another tokenizer

    def soft_dm(**kw) -> FeatureCacheDataModule:
        return FeatureCacheDataModule(str(other), targets="distill_soft", **kw)

    for name in ("distill_tokens.npy", "distill_tokens.json"):
        (other / name).write_bytes((cache / name).read_bytes())
    with pytest.raises(CacheError, match="distill_probs.npy.*missing"):
        soft_dm().setup("fit")
    (other / "distill_probs.npy").write_bytes((cache / "distill_probs.npy").read_bytes())
    with pytest.raises(CacheError, match="distill_probs.json is missing"):
        soft_dm().setup("fit")
    (other / "distill_probs.json").write_bytes((cache / "distill_probs.json").read_bytes())
    with pytest.raises(CacheError, match="made for a cache with tokenizer"):
        soft_dm().setup("fit")
    np.save(other / "short.npy", np.load(cache / "distill_probs.npy", mmap_mode="r")[:10])
    (other / "short.json").write_bytes((cache / "distill_probs.json").read_bytes())
    with pytest.raises(CacheError, match="another cache"):
        soft_dm(distill_probs=str(other / "short.npy")).setup("fit")


def _validate(lit: DraftLitModule, dm: FeatureCacheDataModule) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return {k: float(v) for k, v in trainer.validate(lit, dm, verbose=False)[0].items()}


def test_kl_distillation_raises_agreement_with_main(distilled_cache) -> None:
    cache, _, _ = distilled_cache
    dm = FeatureCacheDataModule(str(cache), batch_size=32, val_batch_size=256, targets="distill_soft")
    torch.manual_seed(0)
    lit = DraftLitModule(net=DRAFT_NET, lr=3e-3, warmup_steps=0, distill_temperature=2.0, distill_weight=1.0)
    before = _validate(lit, dm)
    trainer = L.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(lit, dm)
    after = _validate(lit, dm)
    assert {"val/kl", "val/accuracy", "val/gt_accuracy", "val/exact_L0", "val/accepted_layers"} <= set(after)
    assert after["val/kl"] < 0.8 * before["val/kl"], (before, after)
    assert after["val/accuracy"] > before["val/accuracy"] + 0.1, (before, after)  # agreement with the main model
    assert after["val/accuracy"] != pytest.approx(after["val/gt_accuracy"])  # demos: another target
    assert "train/kl" in trainer.callback_metrics


def test_train_kl_experiment_exports_the_main_model(distilled_cache, tmp_path: Path) -> None:
    cache, main_path, _ = distilled_cache
    out = tmp_path / "logs/draft_proj/runs/r1"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "experiment=draft_proj", f"data.cache_dir={cache}", f"data.distill_tokens={cache / 'distill_tokens.npy'}",
            f"data.distill_probs={cache / 'distill_probs.npy'}", f"data.tokenizer_identity={TOKENIZER_ID}",
            f"backbone.hidden_dim={D}", "data.batch_size=32", "prepare.until=null",
            f"paths.log_dir={tmp_path / 'logs'}", f"paths.output_dir={out}", "logger=csv",
            "callbacks.progress_bar=null", "trainer.accelerator=cpu", "+trainer.fast_dev_run=true",
            *[f"model.net.{k}={v}" for k, v in DRAFT_NET.items() if k != "input_dim"]])
    assert cfg.data.targets == "distill_soft" and cfg.model.distill_temperature == 2.0
    import rsd.train

    metrics = rsd.train.train(cfg)
    assert "val/kl" in metrics and "train/kl" in metrics
    _, info = load_draft_checkpoint(out / "best_draft_with_projection.pt")
    source = info["cache_manifest"]["distill_source"]
    assert info["cache_manifest"]["targets"] == "distill_soft"
    assert source == json.loads((cache / "distill_probs.json").read_text())["main"]
    assert source["path"] == str(main_path.resolve())
