"""Loom: prepare data, train a tokenizer, pretrain, fine-tune, evaluate and serve LLMs."""

__version__ = "0.1.0"
