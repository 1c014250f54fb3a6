"""The engine policy with the VLA's own language model as the main model (``policy=vla_llm``, docs/vla_llm.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rsd.models.checkpoint import load_draft_checkpoint
from rsd.models.vla_llm_main import load_vla_llm_main
from rsd.policies.engine_policy import EnginePolicy, engine_options
from rsd.tokenizer import RFSQTokenizer
from rsd.utils.device import resolve_device


def build_vla_llm_policy(spec: Mapping[str, Any]) -> EnginePolicy:
    """An :class:`EnginePolicy` with the vla_llm main model (policy factory ``vla_llm``, conf/policy/vla_llm.yaml).

    ``spec``: ``main_ckpt`` (a :func:`save_vla_llm_main` file), ``ckpt`` (a draft checkpoint trained on the
    same backbone's features), ``tokenizer`` (RFSQ tokenizer file), ``device``, ``chunk_len``,
    ``trust_checkpoints`` (the draft file; the main file always loads weights only) and every decoding option of
    the engine policy (``acceptance`` / ``delta`` / ``tau`` / ``epsilon``, ``depth``, ``early_exit``,
    ``exit_epsilon``, ``chance_entropy``, ``tail_bounds``, ``draft_layers``, ``accelerate``, ``adaptive``), passed
    to the engine as for ``policy=engine`` (:func:`engine_options`). The backbone is rebuilt from the main file
    (its ``device`` set to ``device``); ``backbone`` is refused (``rsd.policies.registry.check_policy_spec``).
    """
    if spec.get("backbone"):
        raise ValueError("policy=vla_llm rebuilds its backbone from policy.main_ckpt; remove policy.backbone")
    device = str(resolve_device(spec.get("device")))
    main, prompt_backbone = load_vla_llm_main(spec["main_ckpt"], map_location=device,
                                              backbone_overrides={"device": device})
    draft, _ = load_draft_checkpoint(spec["ckpt"], map_location=device, trust=bool(spec.get("trust_checkpoints")))
    if draft.input_dim != main.input_dim:
        raise ValueError(f"the draft expects hidden states of size {draft.input_dim}, the LLM has {main.input_dim}")
    tokenizer = RFSQTokenizer.load(spec["tokenizer"], map_location=device)
    return EnginePolicy(prompt_backbone, draft.to(device).eval(), main.to(device).eval(), tokenizer.to(device).eval(),
                        device=device, chunk_len=spec.get("chunk_len") or 8, **engine_options(spec),
                        info={"draft": spec["ckpt"], "main": spec["main_ckpt"], "tokenizer": spec["tokenizer"],
                              "backbone_id": prompt_backbone.backbone_id, "main_model": "vla_llm"})
