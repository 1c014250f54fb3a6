"""Policies as units (issue 20.3): a config group per registered policy, every option honoured or refused.

No simulator and no trained model: config composition, the registry's checks, and the engine policy on tiny
random models (the options reach the engine under their own names; a bad one fails when the policy is built).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rsd.policies import base
from rsd.policies.registry import (
    CONTEXT_KEYS,
    FACTORIES,
    check_policy_spec,
    engine_group_defaults,
)
from rsd.utils.config import CONFIG_DIR
from rsd.utils.errors import ConfigError


def _eval_policy(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="eval", overrides=list(overrides))
    return OmegaConf.to_container(cfg.policy, resolve=True)


def test_every_registered_policy_has_a_config_group_that_passes_its_checks(tmp_path):
    groups = {p.stem for p in (Path(CONFIG_DIR) / "policy").glob("*.yaml")}
    assert groups == set(FACTORIES)
    actions = tmp_path / "actions.npy"
    import numpy as np

    np.save(actions, np.zeros((4, 7)))
    draft, main, tok = (tmp_path / n for n in ("draft.pt", "main.pt", "rfsq.pt"))
    for f in (draft, main, tok):
        f.write_bytes(b"x")
    extra = {"replay": [f"policy.actions={actions}"],
             "vla_llm": [f"ckpt={draft}", f"policy.main_ckpt={main}", f"policy.tokenizer={tok}"]}
    for name in sorted(FACTORIES):
        spec = _eval_policy(f"policy={name}", *extra.get(name, []))
        assert spec["factory"] == name
        check_policy_spec(spec)  # the group's own values are valid
        assert set(spec) - CONTEXT_KEYS <= FACTORIES[name].options, name  # and it honours every key it holds


def test_engine_is_the_default_group_and_the_legacy_override_paths_stay():
    spec = _eval_policy()
    assert spec["factory"] == "engine" and spec["depth"] == 2 and spec["acceptance"] == "strict"
    assert _eval_policy("policy.depth=4")["depth"] == 4
    # policy.factory=<name> on top of the engine group (the tests' and older docs' form) still works
    spec = _eval_policy("policy.factory=noop", "policy.chunk_len=4")
    check_policy_spec(spec)
    with pytest.raises(ConfigError, match=r"policy=noop does not honour policy.depth=3"):
        check_policy_spec(_eval_policy("policy.factory=noop", "policy.depth=3"))


@pytest.mark.parametrize("name", ["noop", "expert", "replay"])
@pytest.mark.parametrize("key,value", [("depth", 4), ("acceptance", "relaxed"), ("epsilon", 0.1),
                                       ("early_exit", "chance"), ("accelerate", "compile"), ("adaptive", True)])
def test_policies_without_a_decoder_refuse_decoding_options(name, key, value):
    spec = {"factory": name, **({"actions": [[0.0] * 7]} if name == "replay" else {}), key: value}
    with pytest.raises(ConfigError, match=rf"policy={name} does not honour policy.{key}="):
        check_policy_spec(spec)


@pytest.mark.parametrize("key,value,match", [
    ("depth", 0, "policy.depth=0"), ("depth", 9, "policy.depth=9"), ("epsilon", 0.0, "policy.epsilon=0.0"),
    ("epsilon", -1, "policy.epsilon=-1"), ("acceptance", "lenient", "policy.acceptance='lenient'"),
    ("early_exit", "soon", "policy.early_exit='soon'"), ("accelerate", "turbo", "policy.accelerate='turbo'"),
    ("chance_entropy", 1.5, "policy.chance_entropy"), ("draft_layers", 0, "policy.draft_layers=0"),
    ("chunk_len", 0, "policy.chunk_len=0"), ("adaptive", "yes", "policy.adaptive='yes'"),
    ("tail_bounds", "x", "policy.tail_bounds"), ("dpeth", 3, "does not honour policy.dpeth=3"),
])
@pytest.mark.parametrize("factory", ["engine", "vla_llm"])
def test_decoding_policies_check_every_option_before_loading(factory, key, value, match, tmp_path):
    files = {}
    for k in ("ckpt", "main_ckpt", "tokenizer"):
        (tmp_path / k).write_bytes(b"x")
        files[k] = str(tmp_path / k)
    spec = {**engine_group_defaults(), "factory": factory, **files, key: value}
    if factory == "vla_llm":
        spec.pop("backbone", None)
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace("[", r"\[")):
        check_policy_spec(spec)


def test_option_dependencies_are_checked():
    spec = {**engine_group_defaults(), "factory": "engine", "ckpt": "best"}
    with pytest.raises(ConfigError, match="acceptance=epsilon needs policy.epsilon"):
        check_policy_spec({**spec, "acceptance": "epsilon"})
    with pytest.raises(ConfigError, match="adaptive=true needs policy.acceptance=strict"):
        check_policy_spec({**spec, "acceptance": "relaxed", "adaptive": True})
    # the default, adaptive=auto: on for strict (lossless either way), off for the other rules, never an error
    from rsd.policies.engine_policy import engine_options

    assert spec["adaptive"] == "auto" and engine_options(spec)["adaptive"] is True
    check_policy_spec({**spec, "acceptance": "relaxed", "delta": 1})
    assert engine_options({**spec, "acceptance": "relaxed", "delta": 1})["adaptive"] is False
    assert engine_options({**spec, "adaptive": False})["adaptive"] is False
    with pytest.raises(ConfigError, match="early_exit=bound needs policy.exit_epsilon"):
        check_policy_spec({**spec, "early_exit": "bound"})
    check_policy_spec({**spec, "early_exit": "bound", "exit_epsilon": 0.05})
    with pytest.raises(FileNotFoundError, match="ckpt=/no/such/draft.pt"):
        check_policy_spec({**spec, "ckpt": "/no/such/draft.pt"})


def test_vla_llm_needs_its_files_and_refuses_a_backbone(tmp_path):
    with pytest.raises(ConfigError, match="policy=vla_llm needs ckpt="):
        check_policy_spec(_eval_policy("policy=vla_llm"))
    with pytest.raises(ConfigError, match="does not honour policy.backbone"):
        check_policy_spec({"factory": "vla_llm", "backbone": {"name": "sim_state"}})


def test_import_path_factories_are_checked_only_when_they_declare_options():
    with pytest.raises(ConfigError, match="cannot import"):
        check_policy_spec({"factory": "no_such_module_xyz:make"})
    with pytest.raises(ConfigError, match="not a registered policy"):
        check_policy_spec({"factory": "sideways"})
    check_policy_spec({"factory": "rsd.policies.harness:NoopPolicy", "depth": 3})  # declares nothing: not checked


def test_light_constants_match_the_engine():
    from rsd.engine.accelerate import ACCELERATE_MODES
    from rsd.engine.rsd_engine import EXIT_RULES
    assert base.EXIT_RULES == EXIT_RULES and base.ACCELERATE_MODES == ACCELERATE_MODES


def test_engine_options_reach_the_engine_under_their_names_and_fail_at_build():
    """One hop: spec keys -> engine_options -> EnginePolicy -> RSDInferenceEngine, names unchanged; a value only
    the models can refuse (depth beyond the main model's layers) fails when the policy is built, not per episode."""
    from rsd.policies.engine_policy import EnginePolicy, engine_options

    spec = {**engine_group_defaults(), "factory": "engine", "depth": 3, "early_exit": "chance", "chance_entropy": 0.9,
            "draft_layers": 2, "acceptance": "relaxed", "delta": None, "tau": 0.5}
    opts = engine_options(spec)
    assert (set(opts) - {"decoding"}) | set(base.DECODING_KEYS) == set(base.ENGINE_OPTION_KEYS)  # nothing dropped
    assert opts["decoding"] == {"depth": 3, "early_exit": "chance", "chance_entropy": 0.9, "draft_layers": 2}
    assert (opts["acceptance"], opts["delta"], opts["tau"], opts["accelerate"], opts["adaptive"]) == (
        "relaxed", None, 0.5, "eager", False)
    main, draft = _engine_models()
    pol = EnginePolicy(object(), draft, main, None, **opts)
    eng = pol.engine_for("speculative")
    assert (eng.mode, eng.delta, eng.tau, eng.depth, eng.early_exit, eng.chance_entropy, eng.draft_layers) == (
        "relaxed", None, 0.5, 3, "chance", 0.9, 2)
    assert pol.engine_for("baseline").depth == 3  # the baseline at the same depth
    with pytest.raises(ValueError, match="policy options: depth must be in 1..8"):
        EnginePolicy(object(), draft, main, None, decoding={"depth": 0})


def test_baseline_depth_gives_the_baseline_its_own_depth_and_is_checked_before_any_episode():
    """mode=both policy.baseline_depth=8: one run compares depth 2 (speculative) with all 8 layers (baseline),
    paired; the option is refused where it would do nothing and checked against the main model at build."""
    from rsd.evaluate import check_eval_config
    from rsd.policies.engine_policy import EnginePolicy, engine_options

    spec = {**engine_group_defaults(), "factory": "engine", "depth": 2, "baseline_depth": 8}
    opts = engine_options(spec)
    assert opts["baseline_depth"] == 8 and opts["decoding"]["depth"] == 2
    main, draft = _engine_models()
    pol = EnginePolicy(object(), draft, main, None, **opts)
    assert pol.engine_for("speculative").depth == 2 and pol.engine_for("baseline").depth == 8
    assert EnginePolicy(object(), draft, main, None, decoding={"depth": 2}).engine_for("baseline").depth == 2
    main.trained_layers = 3  # a main model trained for layers 0-2 cannot decode 8
    with pytest.raises(ValueError, match=r"policy options \(baseline_depth\): depth 8 needs layers"):
        EnginePolicy(object(), draft, main, None, **opts)
    with pytest.raises(ConfigError, match=r"policy.baseline_depth=9"):
        check_policy_spec({**spec, "baseline_depth": 9})
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["policy.baseline_depth=8"])
        with pytest.raises(ConfigError, match="with mode=speculative use policy.depth"):
            check_eval_config(cfg)
        check_eval_config(compose(config_name="eval", overrides=["policy.baseline_depth=8", "mode=both"]))


def _engine_models():
    import torch

    from rsd.models.draft import RFSQDraftModelWithProjection
    from rsd.models.main_decoder import RFSQMainDecoder

    torch.manual_seed(0)
    main = RFSQMainDecoder(input_dim=32, d_model=32, num_blocks=1, num_heads=2, ff_dim=64).eval()
    draft = RFSQDraftModelWithProjection(input_dim=32, hidden_dim=32, num_heads=2, feedforward_dim=64).eval()
    return main, draft
