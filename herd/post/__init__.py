"""Post-training: SFT and DPO data, (next) SFT, LoRA, DPO, RL."""
