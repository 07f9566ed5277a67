"""Vision-language models: fine-tune any transformers image-text-to-text model, build a small one
from our own language model, and read images in records, task files and requests (images.py)."""
