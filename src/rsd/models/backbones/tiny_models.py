"""Tiny random-weight vision-language models built offline (no Hugging Face hub), for tests and trials.

``build_tiny_llava(out_dir)`` writes a ``LlavaForConditionalGeneration`` (SigLIP vision tower + Llama
text model) with a ``LlavaProcessor`` (SigLIP image processor + a byte-level BPE tokenizer trained with
the ``tokenizers`` library on a few sentences) in the standard Hugging Face layout, so that
``AutoModelForImageTextToText.from_pretrained(out_dir)`` / ``AutoProcessor.from_pretrained(out_dir)``
(and ``backbone=hf_vlm backbone.model_path=<out_dir>``) load it. The weights are random: the features
mean nothing, but the whole path (prompt, image preprocessing, batching, hidden-state extraction,
cache, training, evaluation) runs as with a real model.

CLI: ``python -m rsd.models.backbones.tiny_models data/models/tiny_llava``
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

#: a few sentences in the style of LIBERO instructions, for training the tiny tokenizer
CORPUS = (
    "In: What action should the robot take to pick up the black bowl between the plate and the ramekin "
    "and place it on the plate?\nOut:",
    "pick up the black bowl next to the ramekin and place it on the plate",
    "pick up the black bowl from table center and place it on the plate",
    "pick up the black bowl on the cookie box and place it on the plate",
    "pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate",
    "put the bowl on the stove, open the middle drawer of the cabinet, turn on the stove",
    "pick up the alphabet soup and place it in the basket",
    "USER: <image>\nWhat action should the robot take? ASSISTANT:",
)

#: a minimal chat template (LLaVA-1.5 style) so ``processor.apply_chat_template`` works on the tiny model
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def train_bpe_tokenizer(corpus: Sequence[str] = CORPUS, vocab_size: int = 300,
                        special_tokens: Sequence[str] = ("<unk>", "<s>", "</s>", "<pad>", "<image>"),
                        bos_token: str = "<s>"):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``corpus`` that prepends ``bos_token``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    bos_id = tok.token_to_id(bos_token)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)])
    return tok


def fast_tokenizer(tok, padding_side: str = "left", **special):
    """Wrap a ``tokenizers.Tokenizer`` as a transformers ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    kwargs = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    kwargs.update(special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side=padding_side, **kwargs)


def build_tiny_llava(out_dir: str | os.PathLike, *, text_hidden_size: int = 64, text_layers: int = 2,
                     text_heads: int = 4, vision_hidden_size: int = 32, vision_layers: int = 1,
                     image_size: int = 224, patch_size: int = 32, seed: int = 0) -> Path:
    """Write a tiny random-weight LLaVA (SigLIP + Llama, ``LlavaProcessor``) to ``out_dir``; returns it.

    The hidden state of ``backbone=hf_vlm`` on this model has ``text_hidden_size`` dimensions. At
    224 px / patch 32 an image is 49 tokens; one forward takes a few milliseconds on a CPU.
    """
    import torch
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = fast_tokenizer(train_bpe_tokenizer(), padding_side="left", image_token="<image>",
                               extra_special_tokens={"image_token": "<image>"})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    num_patches = (image_size // patch_size) ** 2
    vision = SiglipVisionConfig(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                                num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                                patch_size=patch_size)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden_size,
                       intermediate_size=2 * text_hidden_size, num_hidden_layers=text_layers,
                       num_attention_heads=text_heads, num_key_value_heads=text_heads,
                       max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=num_patches, vision_feature_select_strategy="full",
                         vision_feature_layer=-1, tie_word_embeddings=False)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    try:  # the PIL backend (the default SiglipImageProcessor wants torchvision)
        from transformers import SiglipImageProcessorPil as image_processor_class
    except ImportError:
        image_processor_class = SiglipImageProcessor
    image_processor = image_processor_class(size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
                               image_token="<image>", num_additional_image_tokens=0)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "README.md").write_text(
        "Tiny random-weight LLaVA (SigLIP vision + Llama text) built offline by "
        "rsd.models.backbones.tiny_models.build_tiny_llava for tests. Not a trained model.\n"
        + json.dumps({"text_hidden_size": text_hidden_size, "text_layers": text_layers,
                      "vision_hidden_size": vision_hidden_size, "image_size": image_size,
                      "patch_size": patch_size, "seed": seed}) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build a tiny random-weight LLaVA offline (for backbone=hf_vlm).")
    parser.add_argument("out_dir")
    parser.add_argument("--text-hidden-size", type=int, default=64)
    parser.add_argument("--text-layers", type=int, default=2)
    args = parser.parse_args(argv)
    path = build_tiny_llava(args.out_dir, text_hidden_size=args.text_hidden_size, text_layers=args.text_layers)
    print(f"tiny LLaVA written to {path} (hidden size {args.text_hidden_size}); use it with "
          f"backbone=hf_vlm backbone.model_path={path} backbone.hidden_dim={args.text_hidden_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
