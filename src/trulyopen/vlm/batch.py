"""A micro-batch of conversations with images: the processor's tensors, and targets row by row.

The processor pads the micro-batch to its longest row and stacks each family's image tensors
(pixel_values, image_grid_thw, pixel_attention_mask, ...); the targets are built per row from the
trained flags its VlmItem carries (vlm/render.py), next-token shifted:

    input_ids   <s> user <img><img><img> What colour ? assistant red <end> <pad> <pad>
    targets       .   .    .    .    .     .     .     .     .  red  <end>  .    .   .     (. = IGNORE)
    owner         0   0    0    0    0     0     0     0     0   0     0   -1   -1         (row = item)

No packing: Qwen2-VL's rope positions are computed per sequence from its image grid, so each row is
one conversation. The batch is a packing.Batch in every way the losses look at (targets, owner,
model_inputs), so token_logps, per_item and the reference log-probabilities take it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trulyopen.train import TrainingError
from trulyopen.train.packing import IGNORE, Batch
from trulyopen.vlm.render import VlmItem, VlmRenderer


@dataclass
class VlmBatch(Batch):
    features: dict = field(default_factory=dict)  # what the processor returned: the model's inputs

    def model_inputs(self, device: torch.device) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.features.items()}


def collate(renderer: VlmRenderer, items: list[VlmItem]) -> VlmBatch:
    """One micro-batch: the processor over the items' texts and images, and each row's targets."""
    images = [img for it in items for img in renderer.images(it)]
    features = dict(renderer.encode([it.text for it in items], images))
    ids, mask = features["input_ids"], features["attention_mask"]
    targets = torch.full_like(ids, IGNORE)
    owner = torch.full_like(ids, -1)
    for b, it in enumerate(items):
        n = int(mask[b].sum())
        if n != len(it):  # the same text and images expand the same way, unless the processor changed
            raise TrainingError(f"the processor made {n} tokens of an item it made {len(it)} of before")
        trained = torch.tensor(it.trained[1:], dtype=torch.bool)
        targets[b, : n - 1] = ids[b, 1:n].masked_fill(~trained, IGNORE)
        owner[b, :n] = b
    return VlmBatch(ids, targets, mask, owner, features)
