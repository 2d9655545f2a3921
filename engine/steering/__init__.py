"""Steering models with crosscoder features, transfer between models, and stitching."""
