"""The engine policy with the VLA's own language model as the main model (``main=vla_llm``, docs/vla_llm.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rsd.policies.engine_policy import EnginePolicy
from rsd.utils.device import resolve_device


def build_vla_llm_policy(spec: Mapping[str, Any]) -> EnginePolicy:
    """An :class:`EnginePolicy` with the vla_llm main model (policy factory ``vla_llm``).

    ``spec``: ``main_ckpt`` (a :func:`save_vla_llm_main` file), ``ckpt`` (a draft checkpoint trained on the
    same backbone's features), ``tokenizer`` (RFSQ tokenizer file), ``device``, ``acceptance`` / ``delta`` /
    ``tau``, ``chunk_len``. The backbone is rebuilt from the main file (its ``device`` set to ``device``).
    """
    from rsd.models.checkpoint import load_draft_checkpoint
    from rsd.models.vla_llm_main import load_vla_llm_main
    from rsd.tokenizer import RFSQTokenizer

    device = str(resolve_device(spec.get("device")))
    main, prompt_backbone = load_vla_llm_main(spec["main_ckpt"], map_location=device,
                                              backbone_overrides={"device": device})
    draft, _ = load_draft_checkpoint(spec["ckpt"], map_location=device)
    if draft.input_dim != main.input_dim:
        raise ValueError(f"the draft expects hidden states of size {draft.input_dim}, the LLM has {main.input_dim}")
    tokenizer = RFSQTokenizer.load(spec["tokenizer"], map_location=device)
    return EnginePolicy(prompt_backbone, draft.to(device).eval(), main.to(device).eval(), tokenizer.to(device).eval(),
                        device=device, acceptance=spec.get("acceptance", "strict"), delta=spec.get("delta", 1),
                        tau=spec.get("tau"), chunk_len=spec.get("chunk_len", 8),
                        info={"draft": spec["ckpt"], "main": spec["main_ckpt"], "tokenizer": spec["tokenizer"],
                              "backbone_id": prompt_backbone.backbone_id, "main_model": "vla_llm"})
