"""Evaluation: quality metrics of models and of their quantized variants."""
