"""Models: architecture presets, building from `transformers` configs, Hugging Face export."""
