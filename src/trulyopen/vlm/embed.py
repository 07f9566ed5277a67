"""The embeddings of prompts with images, so that our batching engine (infer/engine.py) serves a
vision-language model: requests with images are prefilled with the rest, then decode as text.

    prefill ids [k, T] ──► the language model's embedding table ──► [k, T, width] ─┐
    row i's pixels ──► model.get_image_features (its own tower + projector)        │
                       ──► one vector per image token ──► written over row i's ◄───┘
                                                          image tokens, in order
    the engine runs the model on these embeddings (one forward, every new row), and each next
    token is plain text: its id through the embedding table, the image already in the KV cache

This is the merge LlavaModel.forward does itself (get_placeholder_mask, masked_scatter), done row by
row so that rows with images, rows with other images and rows without any share one prefill.

It holds for a family whose image tokens are ordinary tokens to the language model: one position
each, counted like text, and attended causally like text. LLaVA is (with a SigLIP or CLIP tower, as
the VLM quickstart builds: vlm/build.py). Others answer through transformers' generate(), one
request at a time (vlm/generate.py): Qwen2-VL and its successors give each token three positions
(M-RoPE: time, height, width), Gemma 3 lets an image's tokens see each other both ways, and
Idefics3 / SmolVLM would merge the same way but are untested here.
"""

from __future__ import annotations

import torch

BATCHED = frozenset({"llava"})

# a processor's outputs that are the prompt itself, not an image's
TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids"})


def batchable(model: torch.nn.Module) -> bool:
    """Whether our engine serves this vision-language model (its family is in BATCHED)."""
    return model.config.model_type in BATCHED


class ImageEmbedder:
    """The engine's `embed` hook for a model of a BATCHED family."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.table = model.get_input_embeddings()
        self.image_token = model.config.image_token_id

    def __call__(self, ids: torch.Tensor, inputs: list[dict | None]) -> torch.Tensor:
        """[k, T, width]: the embeddings of the prefill's (right-padded) ids, with row i's image
        features in place of its image tokens when inputs[i] holds images (the processor's output
        for that prompt, vlm/generate.prompt_inputs)."""
        x = self.table(ids)
        for i, row in enumerate(inputs):
            if not row or TEXT_KEYS.issuperset(row):
                continue
            n = row["input_ids"].shape[1]  # (past it: padding, whatever ids it holds)
            where = ids[i, :n] == self.image_token
            features = self.features(row)
            if features.shape[0] != int(where.sum()):
                raise ValueError(f"{int(where.sum())} image tokens for {features.shape[0]} image features")
            x[i, :n][where] = features.to(x.dtype)
        return x

    def features(self, row: dict) -> torch.Tensor:
        """[image tokens, width]: the features of a prompt's images, in order, by the model's own
        vision tower and projector."""
        p = next(self.model.parameters())
        pixels = {
            k: v.to(p.device, dtype=p.dtype if v.is_floating_point() else v.dtype)
            for k, v in row.items()
            if k not in TEXT_KEYS
        }
        out = self.model.get_image_features(**pixels, return_dict=True).pooler_output
        if isinstance(out, (list, tuple)):  # one tensor an image
            return torch.cat(list(out))
        return out.reshape(-1, out.shape[-1])
