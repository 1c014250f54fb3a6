"""The token-classification LightningModules (draft, main) share one base and take their network injected."""

from __future__ import annotations

import io

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from rsd import PROJECT_ROOT
from rsd.models.draft import RFSQDraftModelWithProjection
from rsd.models.lit_draft import DraftLitModule
from rsd.models.lit_main import MainDecoderLitModule
from rsd.models.lit_tokens import TokenClassifierLitModule
from rsd.models.main_decoder import RFSQMainDecoder

SMALL = {
    "draft_proj": ["model.net.input_dim=32", "model.net.hidden_dim=32", "model.net.feedforward_dim=64",
                   "model.net.num_heads=2"],
    "main_head": ["model.net.input_dim=32", "model.net.d_model=32", "model.net.num_blocks=1",
                  "model.net.num_heads=2", "model.net.ff_dim=64"],
}


def _model_from_config(experiment: str) -> TokenClassifierLitModule:
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}", *SMALL[experiment]])
    return instantiate(cfg.model)


@pytest.mark.parametrize(("experiment", "lit_class", "net_class"), [
    ("draft_proj", DraftLitModule, RFSQDraftModelWithProjection),
    ("main_head", MainDecoderLitModule, RFSQMainDecoder),
])
def test_config_injects_the_network_and_checkpoints_rebuild_it_without_pickle(experiment, lit_class, net_class):
    lit = _model_from_config(experiment)
    assert type(lit) is lit_class and isinstance(lit, TokenClassifierLitModule)
    assert type(lit.network) is net_class and lit.network.input_dim == 32
    # the hyperparameters hold the constructor arguments as plain data (no module, no _target_) ...
    assert lit.hparams.net == lit.network.config and "_target_" not in lit.hparams.net
    buf = io.BytesIO()
    torch.save({"hyper_parameters": dict(lit.hparams), "state_dict": lit.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # ... so a checkpoint loads without running pickled code
    rebuilt = lit_class(**ckpt["hyper_parameters"])
    rebuilt.load_state_dict(ckpt["state_dict"], strict=True)
    x = torch.randn(2, 32)
    lit.eval(), rebuilt.eval()
    with torch.no_grad():
        if lit_class is DraftLitModule:
            assert torch.equal(lit(x), rebuilt(x))  # same weights, same computation
        else:
            tokens = torch.randint(0, 7, (2, 7, 128))
            assert torch.equal(lit.decoder(x, tokens), rebuilt.decoder(x, tokens))


def test_the_wrong_network_or_unknown_arguments_are_refused():
    with pytest.raises(TypeError, match="must build a RFSQDraftModelWithProjection"):
        DraftLitModule(net=RFSQMainDecoder(input_dim=8, d_model=16, num_blocks=1, num_heads=2, ff_dim=32))
    with pytest.raises(ValueError, match=r"unknown RFSQMainDecoder arguments \['hidden_dim'\]"):
        MainDecoderLitModule(net={"input_dim": 8, "hidden_dim": 16})


def test_optimizer_groups_and_warmup_rules_differ_where_the_models_need_it():
    draft, main = _model_from_config("draft_proj"), _model_from_config("main_head")
    # the draft keeps one group (its optimizer_state_dict loads into a plain AdamW(model.parameters()))
    assert len(list(draft.parameter_groups())) == len(list(draft.model.parameters()))
    groups = main.parameter_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in main.decoder.parameters())  # each parameter exactly once
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim < 2 or "embedding" in n
                                                    for n, p in main.decoder.named_parameters()
                                                    if any(p is q for q in groups[1]["params"]))
    assert draft.warmup_steps(1000) == 30  # warmup_fraction 0.03 of the run
    assert main.warmup_steps(1000) == 100 and main.warmup_steps(100_000) == 500  # at most 10 % of the run
