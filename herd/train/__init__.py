"""Training: data pipeline (tokenised, packed, memory-mapped shards) and the training loop."""
