"""The pipeline that builds every artifact a training run needs (demos -> tokenizer -> cache -> main -> distill)."""
