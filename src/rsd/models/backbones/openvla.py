"""``openvla``: OpenVLA / OpenVLA-OFT from a local directory (Hugging Face layout with remote code).

The directory is a download of the model repository (e.g. ``openvla/openvla-7b-finetuned-libero-spatial``
or an OpenVLA-OFT LIBERO checkpoint): ``config.json`` whose ``auto_map`` names the remote code
(the model's own ``*.py`` files next to the weights), the weights, and the processor/tokenizer files. It is loaded with ``trust_remote_code=True``
through the Auto class its ``auto_map`` names (``AutoModelForVision2Seq`` on transformers 4.x; the
class itself is resolved from ``auto_map`` where the Auto class no longer exists), in bfloat16 on a GPU
and float32 on a CPU.

Feature (as OpenVLA's ``predict_action`` builds its input, without generating):

- prompt ``In: What action should the robot take to {task}?\\nOut:`` with ``task`` the instruction
  lowercased, tokenized by OpenVLA's processor (BOS first), then the empty token 29871 that
  ``predict_action`` appends when the prompt does not already end with it (attention mask 1);
- image: agentview ``[::-1, ::-1]`` resized to 224 with PIL (see :mod:`rsd.models.backbones.hf_vlm`),
  then OpenVLA's image processor;
- one forward with ``output_hidden_states=True``; hidden = ``hidden_states[-1][:, -1]`` (the LLM's last
  layer after the final norm, at the last prompt token: 4096 for the 7B models).

Batching: OpenVLA's forward splices the image patches in after position 0 (assumed to be BOS) and
gives the LLM positions 0..L-1 whatever the attention mask says, so a left-padded batch would change
the features. This backbone therefore batches samples that share a prompt (``padding: group``: no
padding; in LIBERO every frame of a task has the same prompt), which gives exactly the single-sample
features.

OpenVLA-OFT checkpoints load the same way (their remote code also imports the ``prismatic`` package of the
openvla-oft repository, which must be installed). Their forward derives the action-token masks from
``labels``, so the prompt-only forward passes ``labels`` = -100 everywhere (no action token; the
language-model loss it computes is unused). Only the agentview image is given (no wrist image, no
proprio), and the hidden state is that of the last prompt token, not of OFT's action placeholders.

OpenVLA's remote code needs transformers 4.40.x, tokenizers 0.19.x and timm 0.9.x (see
``requirements-openvla.txt`` and ``docs/backbones.md``); on transformers 5.x it does not load.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from rsd.models.backbones.hf_vlm import (
    OPENVLA_PROMPT,
    HFVLMBackbone,
    MissingRemoteCodeError,
    VLMBackboneError,
    _transformers_major,
    read_model_config,
)

#: the empty token OpenVLA's ``predict_action`` appends to the prompt (Llama-2 tokenizer's "▁")
EMPTY_TOKEN_ID = 29871
#: label value the OpenVLA code ignores; OpenVLA-OFT's forward derives its action-token masks from ``labels``
IGNORE_INDEX = -100
#: Auto classes tried in order, when both the installed transformers and the config's auto_map have them
AUTO_CLASSES = ("AutoModelForVision2Seq", "AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModel")
VERSION_HINT = ("OpenVLA's remote code targets transformers 4.40.x, tokenizers 0.19.x and timm 0.9.x: build the "
                "separate environment (requirements-openvla.txt, docs/backbones.md) and run the cache build and "
                "the evaluation from it")


def remote_code_files(path: Path, auto_map: dict[str, Any]) -> dict[str, Path]:
    """``{auto_map key: the .py file it needs}`` for the local entries of ``auto_map``."""
    out = {}
    for key, ref in auto_map.items():
        refs = ref if isinstance(ref, list | tuple) else [ref]
        for r in refs:
            if not r:
                continue
            module = str(r).split("--")[-1].rsplit(".", 1)[0]
            out[f"{key}:{r}"] = path / (module.replace(".", "/") + ".py")
    return out


def check_remote_code(path: Path) -> dict[str, Any]:
    """The ``auto_map`` of ``path/config.json``; raises :class:`MissingRemoteCodeError` without remote code."""
    cfg = read_model_config(path)
    auto_map = cfg.get("auto_map") or {}
    what = ("an OpenVLA / OpenVLA-OFT directory needs config.json with an auto_map naming its remote code and the "
            ".py files (modeling_prismatic.py, configuration_prismatic.py, processing_prismatic.py) next to the "
            "weights: download the whole model repository (e.g. `huggingface-cli download "
            "openvla/openvla-7b-finetuned-libero-spatial --local-dir <dir>`), or use backbone=hf_vlm for a model "
            "that transformers supports natively")
    if not auto_map:
        raise MissingRemoteCodeError(f"{path}/config.json has no auto_map (model_type "
                                     f"{cfg.get('model_type')!r}): no remote code; {what}")
    model_keys = [k for k in auto_map if k.startswith("AutoModel")]
    if not model_keys:
        raise MissingRemoteCodeError(f"{path}/config.json's auto_map {sorted(auto_map)} names no model class; {what}")
    missing = sorted({str(f.name) for f in remote_code_files(path, auto_map).values() if not f.is_file()})
    if missing:
        raise MissingRemoteCodeError(f"{path} lacks the remote code its config.json names: {missing}; {what}")
    return auto_map


def needs_action_labels(model: Any) -> bool:
    """Whether the model's forward is OpenVLA-OFT's, which derives action-token masks from ``labels``
    (``labels=None`` fails there): recognised by its extra ``noisy_actions`` / ``proprio_projector`` arguments."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "noisy_actions" in params or "proprio_projector" in params


class OpenVLABackbone(HFVLMBackbone):
    """OpenVLA / OpenVLA-OFT (remote code) hidden state at the last prompt token; see the module docstring."""

    name = "openvla"
    DEFAULT_PROMPT = OPENVLA_PROMPT
    DEFAULT_PADDING = "group"
    FEATURE_KEYS = (*HFVLMBackbone.FEATURE_KEYS, "empty_token_id")

    def __init__(self, model_path: str | None = None, hidden_dim: int | None = None, device: str = "auto",
                 dtype: str = "auto", batch_size: int = 8, prompt_template: str | None = None,
                 lowercase: bool = True, image_key: str = "agentview_image", image_size: int = 224,
                 resample: str = "lanczos", flip: bool = True, center_crop: bool = False, padding: str | None = None,
                 attn_implementation: str | None = None, empty_token_id: int | None = EMPTY_TOKEN_ID,
                 model_digest: str | None = None, chat_template: bool = False) -> None:
        self.empty_token_id = None if empty_token_id is None else int(empty_token_id)
        if chat_template:
            raise ValueError("openvla uses its fixed prompt format, not a chat template (chat_template=false)")
        super().__init__(model_path, hidden_dim=hidden_dim, device=device, dtype=dtype, batch_size=batch_size,
                         prompt_template=prompt_template, chat_template=False, lowercase=lowercase,
                         image_key=image_key, image_size=image_size, resample=resample, flip=flip,
                         center_crop=center_crop, padding=padding, attn_implementation=attn_implementation,
                         trust_remote_code=True, model_digest=model_digest)

    def _check_options(self) -> None:
        super()._check_options()
        if self.padding != "group":
            raise ValueError("openvla batches samples that share a prompt (padding=group): OpenVLA's forward puts the "
                             "image after position 0 and ignores padding in the positions, so left padding would "
                             "change the features")

    def _extra_definition(self) -> str:
        if self.empty_token_id is None:
            return ""
        return f", token {self.empty_token_id} appended when the prompt does not end with it (as predict_action)"

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.pop("chat_template", None)
        cfg["empty_token_id"] = self.empty_token_id
        return cfg

    # ------------------------------------------------------------------ loading
    def _model_class(self, path: Path, auto_map: dict[str, Any]):
        import transformers

        for key in AUTO_CLASSES:
            if key in auto_map and hasattr(transformers, key):
                return getattr(transformers, key), key
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        key = next(k for k in AUTO_CLASSES + tuple(auto_map) if k in auto_map and k.startswith("AutoModel"))
        return get_class_from_dynamic_module(auto_map[key], str(path), local_files_only=True), key

    def _load(self, path: Path) -> tuple[Any, Any]:
        auto_map = check_remote_code(path)
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=True, local_files_only=True)
        except Exception as err:
            raise VLMBackboneError(f"could not load the processor of {path} (trust_remote_code=True): "
                                   f"{type(err).__name__}: {err}. {self._hint()}") from err
        cls, key = self._model_class(path, auto_map)
        try:
            model = cls.from_pretrained(str(path), trust_remote_code=True, **self._pretrained_kwargs())
        except Exception as err:
            raise VLMBackboneError(f"could not load the model in {path} through {key} (trust_remote_code=True): "
                                   f"{type(err).__name__}: {err}. {self._hint()}") from err
        self._set_left_padding(processor)
        self.forward_needs_labels = needs_action_labels(model)
        return model.to(self._device), processor

    @staticmethod
    def _hint() -> str:
        import transformers

        if _transformers_major() >= 5:
            return f"This is transformers {transformers.__version__}; {VERSION_HINT}."
        return "Check that the directory is a complete download of the model repository."

    # ------------------------------------------------------------------ features
    def model_inputs(self, prompts: list[str], images: list) -> dict[str, Any]:
        """OpenVLA's processor on one group of identical prompts, plus the empty token 29871."""
        if len(set(prompts)) != 1:
            raise VLMBackboneError("openvla batches hold one prompt (padding=group); got several")
        inputs = dict(self.processor(text=list(prompts), images=list(images), return_tensors="pt"))
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        if self.empty_token_id is not None and not bool((input_ids[:, -1] == self.empty_token_id).all()):
            extra = torch.full((input_ids.shape[0], 1), self.empty_token_id, dtype=input_ids.dtype)
            input_ids = torch.cat([input_ids, extra], dim=1)
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
        inputs["input_ids"], inputs["attention_mask"] = input_ids, mask
        if self.forward_needs_labels:  # OpenVLA-OFT: labels with no action token = a prompt-only forward
            inputs["labels"] = torch.full_like(input_ids, IGNORE_INDEX)
        return self._to_device(inputs)
