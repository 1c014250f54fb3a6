"""rsd.tokenizer: the RFSQ action tokenizer (codes ``[B, 8 chunk, 16 latent, 8 layers]``)."""

from rsd.tokenizer.normalizer import ActionNormalizer
from rsd.tokenizer.rfsq import ResidualFSQ, RFSQTokenizer, TokenizerCheckpointError

__all__ = ["ActionNormalizer", "RFSQTokenizer", "ResidualFSQ", "TokenizerCheckpointError"]
