"""The pipeline (rsd.prepare): what ``make train`` runs on a fresh machine, on 1 task x 3 demos and tiny models.

demos -> tokenizer -> cache -> main -> distill -> the distilled draft, the plan printed first; a second run
builds nothing; a changed setting rebuilds that step and the ones after it; the draft's artifact names every
input by content hash; ``ckpt=best`` then resolves the whole chain.
"""

from pathlib import Path

import pytest

from rsd.utils.artifacts import read_artifact, require_artifact

TINY_TOKENIZER = ("['trainer.max_epochs=1','+trainer.max_steps=3','model.net.hidden_dim=32','data.val_fraction=0.5',"
                  "'data.batch_size=64','callbacks.progress_bar=null','trainer.accelerator=cpu']")
TINY_MAIN = ("['trainer.max_epochs=1','+trainer.max_steps=2','model.net.d_model=32','model.net.num_blocks=1',"
             "'model.net.num_heads=2','model.net.ff_dim=64','data.batch_size=64','callbacks.progress_bar=null',"
             "'trainer.accelerator=cpu']")


def tiny_overrides(tmp_path: Path) -> list[str]:
    return [
        "experiment=draft_proj", f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.output_dir={tmp_path / 'logs/draft_proj/runs/r1'}", "prepare.progress=false",
        "prepare.demos.per_task=3", "prepare.demos.tasks=[0]", "prepare.demos.workers=0",
        "prepare.cache.val_fraction=0.5", f"prepare.tokenizer.overrides={TINY_TOKENIZER}",
        f"prepare.main.overrides={TINY_MAIN}", "prepare.main.logger=csv", "logger=csv",
        "callbacks.progress_bar=null", "trainer.accelerator=cpu", "trainer.max_epochs=1",
        "model.net.hidden_dim=32", "model.net.feedforward_dim=64", "model.net.num_heads=2", "data.batch_size=32",
    ]


def compose_train(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from rsd.utils.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.sim
def test_make_train_builds_the_whole_chain_once(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("libero")
    from rsd.data.splits import is_validation_episode
    from rsd.models.checkpoint import load_draft_checkpoint
    from rsd.policies.engine_policy import resolve_engine_spec
    from rsd.prepare import pipeline
    from rsd.train import train

    # the tokenizer run and the cache need a validation episode among 3 demos: val_fraction 0.5 gives one
    val = [is_validation_episode(f"libero_spatial/0/demo_{i}", 0.5) for i in range(3)]
    assert any(val) and not all(val)
    cfg = compose_train(tiny_overrides(tmp_path))
    planned = pipeline.plan(cfg)
    assert [s.name for s in planned] == ["demos", "tokenizer", "cache", "main", "distill"]
    assert all(s.status == "missing" for s in planned)
    assert not (tmp_path / "data").exists()  # planning builds nothing

    metrics = train(cfg)
    printed = capsys.readouterr().out
    assert "Pipeline (rsd.prepare)" in printed and printed.count("BUILD") == 5
    assert "val/accuracy" in metrics
    data = tmp_path / "data"
    folders = {"demos": data / "demos/libero_spatial", "tokenizer": data / "tokenizers/rfsq_libero_spatial",
               "cache": data / "cache/sim_state_libero_spatial", "main": data / "models/main_sim_state_libero_spatial",
               "distill": data / "distill/main_sim_state_libero_spatial"}
    manifests = {k: require_artifact(v, k) for k, v in folders.items()}  # every artifact intact, of its kind
    assert manifests["cache"]["inputs"]["demos"]["content_hash"] == manifests["demos"]["content_hash"]
    assert manifests["distill"]["inputs"]["main"]["content_hash"] == manifests["main"]["content_hash"]

    run = tmp_path / "logs/draft_proj/runs/r1"
    draft = require_artifact(run, "draft")
    assert draft["files"].keys() == {"best_draft_with_projection.pt"}
    assert {k: v["content_hash"] for k, v in draft["inputs"].items()} == {
        k: m["content_hash"] for k, m in manifests.items()}
    assert draft["code"]["commit"]  # the code version is recorded
    _, info = load_draft_checkpoint(run / "best_draft_with_projection.pt")
    assert info["cache_manifest"]["content_hash"] == manifests["cache"]["content_hash"]
    assert info["cache_manifest"]["targets"] == "distill_soft"
    assert info["cache_manifest"]["distill_source"]["content_hash"] == manifests["main"]["content_hash"]

    # a second run builds nothing (content identity, not file presence) ...
    again = pipeline.plan(compose_train(tiny_overrides(tmp_path)))
    assert [s.status for s in again] == ["up to date"] * 5
    # ... a changed file is noticed, and a changed setting rebuilds that step and what depends on it
    (folders["distill"] / "distill_tokens.json").write_text("{}")
    stale = {s.name: s.status for s in pipeline.plan(compose_train(tiny_overrides(tmp_path)))}
    assert "changed since the manifest was written" in stale["distill"] and stale["main"] == "up to date"
    changed = pipeline.plan(compose_train([*tiny_overrides(tmp_path), "prepare.cache.hidden_dtype=float32"]))
    assert [s.status for s in changed][:2] == ["up to date"] * 2
    assert changed[2].status == "settings changed" and changed[3].status == "input cache will be rebuilt"

    # evaluation resolves the chain from the draft: ckpt=best -> that draft, its main model, its tokenizer
    (folders["distill"] / "distill_tokens.json").unlink()
    spec = resolve_engine_spec({"ckpt": "best", "suite": "libero_spatial", "log_dir": str(tmp_path / "logs")})
    assert Path(spec["ckpt"]) == run / "best_draft_with_projection.pt"
    assert Path(spec["main_ckpt"]) == folders["main"] / "main_decoder.pt"
    assert Path(spec["tokenizer"]) == folders["tokenizer"] / "rfsq.pt"
    assert read_artifact(folders["main"])["kind"] == "main"
