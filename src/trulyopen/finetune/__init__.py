"""Post-training: SFT, DPO and GRPO, on full weights or with LoRA / QLoRA adapters (see loop.py)."""
