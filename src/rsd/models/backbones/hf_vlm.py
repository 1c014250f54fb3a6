"""``hf_vlm``: a local transformers image-text-to-text model as the backbone (and the shared VLM machinery).

Feature: ``hidden_states[-1][:, -1]`` of one forward pass with ``output_hidden_states=True`` (no
generation): the last layer (after the final norm), at the last prompt token. Per observation:

- prompt: ``prompt_template`` with ``{task}`` = the instruction (lowercased, as OpenVLA does) and
  ``{image}`` = the processor's image token (``<image>`` for LLaVA); or, with ``chat_template: true``,
  the processor's chat template around ``[image, prompt text]`` with the generation prompt added;
- image: ``obs[image_key]`` (LIBERO's agentview, upside down as LIBERO renders it) rotated 180 degrees
  (``img[::-1, ::-1]``, as the OpenVLA / OpenVLA-OFT LIBERO evaluations do), optionally centre-cropped
  to 90 % of its area (``center_crop``, OpenVLA's eval option for checkpoints trained with random
  crops), resized to ``image_size`` (224) with PIL (``resample``, Lanczos by default), then given to the
  model's own processor;
- batches: ``padding: left`` tokenizes a batch with left padding (the tokenizer is switched to
  ``padding_side="left"``), so ``[:, -1]`` is every sample's real last token; ``padding: group`` runs
  one forward per distinct prompt instead (no padding at all: exact for any model).

The model runs in bfloat16 on a GPU and float32 on a CPU (``dtype: auto``); features are returned as
float32 on the backbone's device. Nothing is ever substituted: a failed or non-finite forward raises.

The backbone id (cache manifest, checkpoint identity) hashes the model files (``config.json`` and the
other small files completely, each weight file's name, size and first MiB) and every option that
changes the feature, so a cache is never reused with another model or preprocessing. ``model_path`` is
recorded as given (relative paths are resolved against the project root, then the working directory).

Errors are :class:`VLMBackboneError` subclasses (a ``BackboneError``) that say what to do.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd import PROJECT_ROOT
from rsd.models.backbones.base import Backbone, BackboneError
from rsd.utils.device import DeviceUnavailableError as _DeviceUnavailableError
from rsd.utils.device import resolve_device

log = logging.getLogger(__name__)

FEATURE_VERSION = 1
FEATURE = "hidden_states[-1][:, -1]"
#: OpenVLA's LIBERO prompt (``{task}`` = the lowercased instruction)
OPENVLA_PROMPT = "In: What action should the robot take to {task}?\nOut:"
PADDING = ("left", "group")
RESAMPLE = ("lanczos", "bicubic", "bilinear", "nearest")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
#: OpenVLA's ``center_crop``: keep 90 % of the image area
CENTER_CROP_AREA = 0.9
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_DIGEST_HEAD = 1 << 20


# ---------------------------------------------------------------------------------------------- errors
class VLMBackboneError(BackboneError):
    """A vision-language backbone could not be built or could not produce a feature."""


class ModelNotFoundError(VLMBackboneError):
    """``model_path`` is not a model directory (no folder, or no ``config.json``)."""


class MissingRemoteCodeError(VLMBackboneError):
    """A remote-code model directory (OpenVLA) lacks its ``auto_map`` or its ``.py`` files."""


class HiddenDimMismatchError(VLMBackboneError):
    """The model's hidden size differs from the one the cache / draft / config expects."""


class DeviceUnavailableError(VLMBackboneError, _DeviceUnavailableError):
    """The requested device (e.g. ``cuda``) does not exist on this machine."""


# ---------------------------------------------------------------------------------------------- helpers
def resolve_model_path(model_path: str | os.PathLike) -> Path:
    """Absolute paths as they are; relative ones against the project root, else the working directory."""
    path = Path(os.path.expanduser(str(model_path)))
    if path.is_absolute():
        return path
    for base in (PROJECT_ROOT, Path.cwd()):
        if (base / path).exists():
            return base / path
    return PROJECT_ROOT / path


def check_model_dir(model_path: str | os.PathLike | None, what: str = "model") -> Path:
    if not model_path:
        raise ModelNotFoundError(f"no model_path given for the {what}: set backbone.model_path=<local directory "
                                 "with config.json and the weights> (nothing is downloaded here)")
    path = resolve_model_path(model_path)
    if not path.is_dir():
        raise ModelNotFoundError(f"{what} directory {path} does not exist: set backbone.model_path to a local copy "
                                 "of the model (the Hugging Face layout: config.json, weights, processor files)")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face model directory (download the whole "
                                 "repository, e.g. `huggingface-cli download <repo> --local-dir <dir>`)")
    return path


def read_model_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"{path / 'config.json'} is not readable JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise ModelNotFoundError(f"{path / 'config.json'} is not a JSON object")
    return cfg


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on a GPU, float32 on a CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    key = str(dtype).replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
    return DTYPES[key]


def model_files_digest(path: str | os.PathLike) -> str:
    """SHA-256 (16 hex) of a model directory: small files completely, weight files by name, size, first MiB."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        if f.suffix.lower() in (".md",) or f.name == "LICENSE":
            continue
        h.update(f.name.encode() + b"\0")
        size = f.stat().st_size
        h.update(str(size).encode() + b"\0")
        with f.open("rb") as fh:
            if f.name.endswith(WEIGHT_SUFFIXES) or size > (64 << 20):
                h.update(fh.read(_DIGEST_HEAD))
            else:
                h.update(fh.read())
    return h.hexdigest()[:16]


def check_hidden_dim(backbone: Backbone, expected: int | None, where: str = "the feature cache") -> None:
    """Raise :class:`HiddenDimMismatchError` when ``backbone.hidden_dim != expected`` (None: not checked)."""
    if expected is None:
        return
    if int(backbone.hidden_dim) != int(expected):
        raise HiddenDimMismatchError(
            f"the backbone {backbone.backbone_id} produces hidden states of size {backbone.hidden_dim}, but "
            f"{where} expects {int(expected)}. Use the model the cache/draft was built with, or set "
            f"backbone.hidden_dim={backbone.hidden_dim} (and model.net.input_dim) and rebuild the feature cache "
            "and retrain the draft/main models for this model")


def text_hidden_size(config: Any) -> int | None:
    """Hidden size of the language model of a (composite) transformers config."""
    getter = getattr(config, "get_text_config", None)
    candidates = []
    if callable(getter):
        try:
            candidates.append(getter())
        except Exception:  # older or remote configs without a usable get_text_config
            log.debug("get_text_config failed", exc_info=True)
    for name in ("text_config", "llm_config", "language_config"):
        sub = getattr(config, name, None)
        if sub is not None:
            candidates.append(sub)
    candidates.append(config)
    for cfg in candidates:
        size = cfg.get("hidden_size") if isinstance(cfg, Mapping) else getattr(cfg, "hidden_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return None


def prepare_image(image: Any, image_size: int = 224, resample: str = "lanczos", flip: bool = True,
                  center_crop: bool = False):
    """LIBERO camera array (H, W, 3 uint8, upside down) -> the PIL image the VLM's processor receives.

    Rotated 180 degrees (``[::-1, ::-1]``) when ``flip``, resized to ``image_size``; with ``center_crop``
    the central 90 % of the area is cropped and resized back to ``image_size`` (OpenVLA's eval option).
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise VLMBackboneError(f"expected an image array [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() and arr.max() <= 1.0 and arr.min() >= 0:
            arr = np.round(arr * 255.0)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    arr = arr[..., :3]
    if flip:
        arr = arr[::-1, ::-1]
    method = getattr(Image, "Resampling", Image)
    mode = {"lanczos": method.LANCZOS, "bicubic": method.BICUBIC, "bilinear": method.BILINEAR,
            "nearest": method.NEAREST}[resample]
    img = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
    size = (int(image_size), int(image_size))
    if img.size != size:
        img = img.resize(size, mode)
    if center_crop:
        scale = math.sqrt(CENTER_CROP_AREA)
        w, h = img.size
        cw, ch = w * scale, h * scale
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        img = img.resize(size, mode, box=box)
    return img


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:n] or "model"


# ---------------------------------------------------------------------------------------------- backbone
class HFVLMBackbone(Backbone):
    """A local image-text-to-text model (``AutoModelForImageTextToText`` + ``AutoProcessor``); see module doc."""

    name = "hf_vlm"
    needs_images = True
    #: ``{image}``: the processor's image token; ``{task}``: the (lowercased) instruction
    DEFAULT_PROMPT = "{image}\n" + OPENVLA_PROMPT
    DEFAULT_PADDING = "left"
    #: constructor arguments that change the feature (part of ``backbone_id``)
    FEATURE_KEYS = ("prompt_template", "chat_template", "lowercase", "image_key", "image_size", "resample", "flip",
                    "center_crop")

    def __init__(self, model_path: str | None = None, hidden_dim: int | None = None, device: str = "auto",
                 dtype: str = "auto", batch_size: int = 8, prompt_template: str | None = None,
                 chat_template: bool = False, lowercase: bool = True, image_key: str = "agentview_image",
                 image_size: int = 224, resample: str = "lanczos", flip: bool = True, center_crop: bool = False,
                 padding: str | None = None, attn_implementation: str | None = None,
                 trust_remote_code: bool = False, model_digest: str | None = None) -> None:
        self.model_path = str(model_path) if model_path is not None else ""
        self.requested_device = "auto" if device in (None, "") else str(device)
        self.requested_dtype = "auto" if dtype in (None, "") else str(dtype).replace("torch.", "")
        self.batch_size = int(batch_size)
        self.prompt_template = self.DEFAULT_PROMPT if prompt_template is None else str(prompt_template)
        self.chat_template = bool(chat_template)
        self.lowercase = bool(lowercase)
        self.image_key = str(image_key)
        self.image_size = int(image_size)
        self.resample = str(resample)
        self.flip = bool(flip)
        self.center_crop = bool(center_crop)
        self.padding = self.DEFAULT_PADDING if padding is None else str(padding)
        self.attn_implementation = attn_implementation
        self.trust_remote_code = bool(trust_remote_code)
        self._check_options()
        try:
            self._device = resolve_device(self.requested_device)
        except _DeviceUnavailableError as err:  # the backbone's own error type, as its callers expect
            raise DeviceUnavailableError(str(err)) from err
        self._model_dtype = resolve_dtype(self.requested_dtype, self._device)
        self.path = check_model_dir(self.model_path, self.name)
        self.model_digest = model_files_digest(self.path)
        if model_digest is not None and model_digest != self.model_digest:
            raise VLMBackboneError(
                f"the model files in {self.path} differ from those the features were computed with (digest "
                f"{self.model_digest}, recorded {model_digest}): point backbone.model_path at the original model, "
                "or rebuild the feature cache (and retrain) with this one")
        self.model, self.processor = self._load(self.path)
        self.model.eval()
        self.model.requires_grad_(False)
        size = text_hidden_size(self.model.config)
        if size is None:
            raise VLMBackboneError(f"cannot read the language model's hidden_size from {self.path / 'config.json'}")
        self._hidden_dim = int(size)
        check_hidden_dim(self, hidden_dim, where="backbone.hidden_dim")
        log.info("%s: %s on %s (%s), hidden size %d", self.name, self.path, self._device, self._model_dtype,
                 self._hidden_dim)

    # ------------------------------------------------------------------ options / identity
    def _check_options(self) -> None:
        if self.padding not in PADDING:
            raise ValueError(f"padding must be one of {PADDING}, got {self.padding!r}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {RESAMPLE}, got {self.resample!r}")
        if self.batch_size < 1 or self.image_size < 8:
            raise ValueError(f"batch_size must be >= 1 and image_size >= 8 (got {self.batch_size}, {self.image_size})")
        if "{task}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{task}}: {self.prompt_template!r}")

    @property
    def hidden_dim(self) -> int:
        return self._hidden_dim

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def model_dtype(self) -> torch.dtype:
        return self._model_dtype

    @classmethod
    def _feature_spec(cls, cfg: Mapping[str, Any]) -> dict[str, Any]:
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        spec = {k: cfg.get(k, defaults.get(k)) for k in cls.FEATURE_KEYS}
        if spec.get("prompt_template") is None:
            spec["prompt_template"] = cls.DEFAULT_PROMPT
        return {"version": FEATURE_VERSION, "feature": FEATURE, "backbone": cls.name, **spec}

    @classmethod
    def id_from_config(cls, cfg: Mapping[str, Any]) -> str | None:
        model_path = cfg.get("model_path")
        if not model_path:
            return None
        digest = cfg.get("model_digest")
        if digest is None:
            path = resolve_model_path(model_path)
            if not (path / "config.json").is_file():
                return None
            digest = model_files_digest(path)
        spec = json.dumps({**cls._feature_spec(cfg), "model_digest": digest}, sort_keys=True)
        name = _slug(Path(str(model_path)).name)
        return f"{cls.name}-{name}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"

    @property
    def backbone_id(self) -> str:
        return self.id_from_config(self.config())  # type: ignore[return-value]

    @property
    def feature_definition(self) -> str:
        if self.chat_template:
            prompt = f"the processor's chat template around [image, {self.prompt_template!r}]"
        else:
            prompt = f"prompt {self.prompt_template!r}"
        return (f"{self.name} v{FEATURE_VERSION}: {FEATURE} (last layer after the final norm, last prompt token) "
                f"of {type(self.model).__name__} from {Path(self.model_path).name} (files {self.model_digest}), "
                f"one forward with output_hidden_states=True; {prompt} with {{task}} = the instruction"
                f"{' lowercased' if self.lowercase else ''}; image obs[{self.image_key!r}]"
                f"{' rotated 180 degrees ([::-1, ::-1])' if self.flip else ''}, resized to {self.image_size} "
                f"(PIL {self.resample}){', centre crop 90% area' if self.center_crop else ''}, then the model's "
                f"processor{self._extra_definition()}")

    def _extra_definition(self) -> str:
        return ""

    def config(self) -> dict[str, Any]:
        cfg = {"name": self.name, "model_path": self.model_path, "hidden_dim": self._hidden_dim,
               "device": self.requested_device, "dtype": self.requested_dtype, "batch_size": self.batch_size,
               "prompt_template": self.prompt_template, "chat_template": self.chat_template,
               "lowercase": self.lowercase, "image_key": self.image_key, "image_size": self.image_size,
               "resample": self.resample, "flip": self.flip, "center_crop": self.center_crop,
               "padding": self.padding, "attn_implementation": self.attn_implementation,
               "model_digest": self.model_digest}
        if "trust_remote_code" in inspect.signature(type(self).__init__).parameters:
            cfg["trust_remote_code"] = self.trust_remote_code
        return cfg

    # ------------------------------------------------------------------ loading
    def _pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"local_files_only": True}  # a local directory; never the hub
        if _transformers_major() >= 5:
            kwargs["dtype"] = self._model_dtype
        else:
            kwargs["torch_dtype"] = self._model_dtype
            kwargs["low_cpu_mem_usage"] = True
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs

    def _load(self, path: Path) -> tuple[Any, Any]:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=self.trust_remote_code,
                                                      local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(str(path), trust_remote_code=self.trust_remote_code,
                                                                **self._pretrained_kwargs())
        except Exception as err:
            hint = ""
            if read_model_config(path).get("auto_map") and not self.trust_remote_code:
                hint = (" Its config.json names remote code (auto_map): for OpenVLA use backbone=openvla, for "
                        "other remote-code models set backbone.trust_remote_code=true.")
            raise VLMBackboneError(f"could not load an image-text-to-text model and processor from {path}: "
                                   f"{type(err).__name__}: {err}.{hint}") from err
        self._set_left_padding(processor)
        return model.to(self._device), processor

    @staticmethod
    def _set_left_padding(processor: Any) -> None:
        tok = getattr(processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"

    # ------------------------------------------------------------------ features
    def build_prompt(self, instruction: str) -> str:
        task = str(instruction).lower() if self.lowercase else str(instruction)
        if self.chat_template:
            text = self.prompt_template.replace("{image}", "").replace("{task}", task).strip()
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            try:
                return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as err:
                raise VLMBackboneError(f"the processor of {self.path} has no usable chat template ({err}); set "
                                       "backbone.chat_template=false and a prompt_template") from err
        image_token = getattr(self.processor, "image_token", None) or ""
        return self.prompt_template.replace("{image}", image_token).replace("{task}", task)

    def prepare_image(self, obs: Mapping[str, Any]):
        if self.image_key not in obs:
            raise VLMBackboneError(
                f"{self.name}: the observation has no {self.image_key!r} image (keys: {sorted(obs)[:10]}...): the "
                "env must render cameras (the backbone's needs_images=True makes the cache builder and the "
                "evaluation build it with images)")
        return prepare_image(obs[self.image_key], self.image_size, self.resample, self.flip, self.center_crop)

    def _groups(self, prompts: Sequence[str]) -> list[list[int]]:
        if self.padding == "left":
            return [list(range(len(prompts)))]
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        return list(groups.values())

    def _to_device(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self._device, dtype=self._model_dtype) if v.is_floating_point() else v.to(self._device)
            out[k] = v
        return out

    def model_inputs(self, prompts: list[str], images: list) -> dict[str, Any]:
        """Processor outputs for one batch (left-padded), on the device."""
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True)
        mask = inputs.get("attention_mask")
        if mask is not None and not bool((mask[:, -1] == 1).all()):
            raise VLMBackboneError(f"the tokenizer of {self.path} pads on the right, so [:, -1] would read pad tokens; "
                                   "it must pad on the left (or use backbone.padding=group)")
        return self._to_device(inputs)

    def _forward(self, prompts: list[str], images: list) -> torch.Tensor:
        inputs = self.model_inputs(prompts, images)
        try:
            with torch.inference_mode():
                out = self.model(**inputs, output_hidden_states=True, use_cache=False)
        except Exception as err:
            raise VLMBackboneError(f"{self.name}: the forward pass of {self.path} failed: {type(err).__name__}: "
                                   f"{err}") from err
        hidden_states = getattr(out, "hidden_states", None)
        if hidden_states is None and isinstance(out, Mapping):
            hidden_states = out.get("hidden_states")
        if not hidden_states:
            raise VLMBackboneError(f"{self.name}: the model's forward returned no hidden_states "
                                   "(output_hidden_states=True was ignored)")
        h = hidden_states[-1][:, -1].float()
        if h.shape != (len(prompts), self._hidden_dim):
            raise VLMBackboneError(f"{self.name}: hidden state has shape {tuple(h.shape)}, expected "
                                   f"({len(prompts)}, {self._hidden_dim})")
        if not bool(torch.isfinite(h).all()):
            raise VLMBackboneError(f"{self.name}: the hidden state is not finite (dtype {self._model_dtype}); "
                                   "try backbone.dtype=float32")
        return h

    def encode(self, observations: list[dict], instructions: list[str]) -> torch.Tensor:
        if len(observations) != len(instructions):
            raise ValueError(f"{len(observations)} observations but {len(instructions)} instructions")
        images = [self.prepare_image(o) for o in observations]
        prompts = [self.build_prompt(i) for i in instructions]
        out = torch.empty(len(prompts), self._hidden_dim, dtype=torch.float32, device=self._device)
        for group in self._groups(prompts):
            for s in range(0, len(group), self.batch_size):
                idx = group[s: s + self.batch_size]
                out[idx] = self._forward([prompts[i] for i in idx], [images[i] for i in idx])
        return out
