"""Harvesting paired activations: token alignment across tokenizers."""
