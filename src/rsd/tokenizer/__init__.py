"""rsd.tokenizer"""
