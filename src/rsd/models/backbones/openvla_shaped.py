"""OpenVLA-7B's prismatic backbone with random weights, for latency benchmarks without a download.

Built from transformers config classes (no remote code): DINOv2 (with registers) + SigLIP patch features ->
OpenVLA's fused GELU MLP projector -> image tokens after BOS -> Llama prefill. ``scripts/benchmark_gpu_latency.py``
times it (``--backbone openvla-shaped``); the real model is ``backbone=openvla`` (:mod:`rsd.models.backbones.openvla`).
"""

from __future__ import annotations

import torch

from rsd.models.hf_cache import cache_kwarg, output_cache

OPENVLA_ACTION_TOKENS = 7  # OpenVLA generates one token per action dimension: prefill + 6 decode steps

#: sizes per ``--backbone-scale``: Llama text model, DINOv2 (with registers) and SigLIP vision towers. Every scale
#: keeps 224 px, patch 14 (256 patches per tower), the 3-layer projector and vocab 32000 (OpenVLA pads it to 32064)
BACKBONE_SCALES = {
    "full": {  # Llama-2-7B, DINOv2-L/14 (reg4), SigLIP-so400m/14 at 224 px: OpenVLA-7B's prismatic backbone
        "llm": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
        "dino": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4),
        "siglip": dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304),
    },
    "small": {
        "llm": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1376),
        "dino": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=4),
        "siglip": dict(hidden_size=288, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1152),
    },
    "tiny": {
        "llm": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=172),
        "dino": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=4),
        "siglip": dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96),
    },
}
IMAGE_SIZE, PATCH_SIZE, VOCAB_SIZE, NUM_REGISTERS = 224, 14, 32000, 4


class OpenVLAShapedBackbone(torch.nn.Module):
    """OpenVLA's prismatic structure with random weights (transformers classes, no remote code).

    ``forward(obs) -> hidden [1, D]``: DINOv2 + SigLIP patch features (second-to-last layer, prefix tokens
    dropped, as OpenVLA's timm featurizers) concatenated channel-wise -> fused GELU MLP projector (3 linear
    layers) -> image tokens spliced in after BOS -> Llama prefill -> last layer (final norm) at the last token.
    ``generate_action(obs)``: OpenVLA's greedy autoregressive action (7 tokens: prefill + 6 cached steps).
    ``obs``: ``{"input_ids" [1, T], "pixels_dino" [1, 3, 224, 224], "pixels_siglip" [1, 3, 224, 224]}``.
    """

    def __init__(self, scale: str) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

        try:
            from transformers import Dinov2WithRegistersConfig as DinoConfig
            from transformers import Dinov2WithRegistersModel as DinoModel
            reg = dict(num_register_tokens=NUM_REGISTERS)
        except ImportError:  # older transformers: DINOv2 without registers (4 tokens fewer)
            from transformers import Dinov2Config as DinoConfig
            from transformers import Dinov2Model as DinoModel
            reg = {}
        sizes = BACKBONE_SCALES[scale]
        self.scale = scale
        self.dino = DinoModel(DinoConfig(**sizes["dino"], image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                         layerscale_value=1.0, **reg)).eval()
        self.num_prefix = 1 + int(reg.get("num_register_tokens", 0))  # CLS (+ registers)
        self.siglip = SiglipVisionModel(SiglipVisionConfig(**sizes["siglip"], image_size=IMAGE_SIZE,
                                                           patch_size=PATCH_SIZE, vision_use_head=False)).eval()
        llm = sizes["llm"]
        self.llm = LlamaForCausalLM(LlamaConfig(**llm, num_key_value_heads=llm["num_attention_heads"],
                                                vocab_size=VOCAB_SIZE, max_position_embeddings=2048,
                                                rms_norm_eps=1e-5, tie_word_embeddings=False)).eval()
        vision_dim = sizes["dino"]["hidden_size"] + sizes["siglip"]["hidden_size"]
        d = llm["hidden_size"]
        # OpenVLA's FusedMLPProjector ("fused-gelu-mlp"): vision_dim -> 4 * vision_dim -> D -> D
        self.projector = torch.nn.Sequential(torch.nn.Linear(vision_dim, 4 * vision_dim), torch.nn.GELU(),
                                             torch.nn.Linear(4 * vision_dim, d), torch.nn.GELU(),
                                             torch.nn.Linear(d, d)).eval()
        self.hidden_dim = d
        self.vision_dim = vision_dim
        self._cache_kwarg = cache_kwarg(self.llm)

    def sizes(self) -> dict:
        """The exact sizes and parameter counts (printed and written to the JSON)."""
        def count(m):
            return sum(p.numel() for p in m.parameters())

        out = {k: dict(v) for k, v in BACKBONE_SCALES[self.scale].items()}
        out["llm"].update(vocab_size=VOCAB_SIZE, attn=getattr(self.llm.config, "_attn_implementation", None))
        out["dino"]["num_register_tokens"] = self.num_prefix - 1
        out["projector"] = [self.vision_dim, 4 * self.vision_dim, self.hidden_dim, self.hidden_dim]
        out["image"] = dict(size=IMAGE_SIZE, patch=PATCH_SIZE, patches_per_tower=(IMAGE_SIZE // PATCH_SIZE) ** 2)
        out["params_m"] = {k: round(count(getattr(self, k)) / 1e6, 2) for k in ("dino", "siglip", "projector", "llm")}
        out["params_m"]["total"] = round(count(self) / 1e6, 2)
        return out

    def dino_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.dino(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2][:, self.num_prefix:]

    def siglip_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.siglip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]

    def image_tokens(self, obs: dict) -> torch.Tensor:
        fused = torch.cat([self.dino_patches(obs["pixels_dino"]), self.siglip_patches(obs["pixels_siglip"])], dim=-1)
        return self.projector(fused)

    def embeddings(self, obs: dict) -> torch.Tensor:
        """``[1, T + 256, D]``: BOS, the image tokens, the rest of the prompt (OpenVLA's order)."""
        text = self.llm.get_input_embeddings()(obs["input_ids"])
        return torch.cat([text[:, :1], self.image_tokens(obs), text[:, 1:]], dim=1)

    def features(self, embeds: torch.Tensor) -> torch.Tensor:
        """LLM prefill without the LM head -> last layer (after the final norm) at the last token."""
        return self.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]

    def forward(self, obs: dict) -> torch.Tensor:
        return self.features(self.embeddings(obs))

    def generate_from_embeddings(self, embeds: torch.Tensor, num_tokens: int = OPENVLA_ACTION_TOKENS) -> torch.Tensor:
        """Greedy decoding with a KV cache: prefill (last-token logits) + ``num_tokens - 1`` steps -> ``[1, n]``."""
        out = self.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        for _ in range(num_tokens - 1):
            out = self.llm(input_ids=token, use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        return torch.cat(tokens, dim=1)

    def generate_action(self, obs: dict) -> torch.Tensor:
        """OpenVLA's per-action path on this backbone: vision + projector + prefill + 6 decode steps."""
        return self.generate_from_embeddings(self.embeddings(obs))
