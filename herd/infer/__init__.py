"""Inference: KV caches, sampling, generation."""
