"""SFT and DPO on conversations with images: the text objectives, fed rows instead of packed items.

    VlmSFT   a step is `batch_size` conversations (a pure function of seed and step, epochs shuffled),
             padded per micro-batch; loss: the mean over the step's trained (assistant) tokens
    VlmDPO   a step is `batch_size` pairs; a pair's two replies are rows 2i and 2i+1 of a micro-batch,
             so per_item gives (chosen, rejected) as for packed text; the reference log-probabilities
             are cached once, or read with the adapter off (LoRA), exactly as DPO does

Everything else (the losses, the reference, the summary, the pair statistics) is SFT's and DPO's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trulyopen.recipe import FinetuneConfig
from trulyopen.train.objectives import Micro, StepBatch, chunks, cycle
from trulyopen.train.objectives.preference import DPO
from trulyopen.train.objectives.sft import SFT
from trulyopen.vlm.batch import VlmBatch, collate
from trulyopen.vlm.render import VlmItem, VlmRenderer


class VlmSFT(SFT):
    name = "sft"

    def __init__(self, cfg: FinetuneConfig, items: list[VlmItem], val: list[VlmItem], renderer: VlmRenderer):
        self.cfg, self.items, self.val, self.renderer = cfg, items, val, renderer
        self.batch_size, self.micro = cfg.batch_size, cfg.micro_batch_size

    def batch(self, step: int, model: torch.nn.Module) -> StepBatch:
        idx = cycle(len(self.items), self.cfg.seed, step * self.batch_size, self.batch_size)
        micros = [collate(self.renderer, [self.items[i] for i in part]) for part in chunks(idx, self.micro)]
        tokens = sum(b.trained_tokens for b in micros)
        epoch = step * self.batch_size / len(self.items)
        return StepBatch(
            [Micro(b, tokens=b.real_tokens) for b in micros],
            tokens,
            {"trained_tokens": tokens, "epoch": round(epoch, 4)},
        )

    def val_batches(self) -> list[VlmBatch]:
        return [collate(self.renderer, part) for part in chunks(self.val, self.micro)]


class VlmDPO(DPO):
    def __init__(self, cfg: FinetuneConfig, pairs: list, val: list, renderer: VlmRenderer, cache: Path):
        super().__init__(cfg, pairs, val, pad_id=-1, cache=cache)  # the processor pads
        self.renderer = renderer

    def _packed(self, pairs: list) -> VlmBatch:
        return collate(self.renderer, [it for pair in pairs for it in pair])
