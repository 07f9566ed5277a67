"""Attention kept inside each packed segment (a pretraining document, or one fine-tuning example).

Several segments share one row so no compute goes to padding; a block-diagonal causal mask and
positions that restart at each segment make every segment see only itself, as if it were alone.
"""

from __future__ import annotations

import torch


def segment_attention(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(4D boolean mask [B, 1, T, T], position ids [B, T]) from segment ids [B, T] that are
    non-decreasing along each row (equal ids = one segment):

        segments  0 0 0 1 1 2 2 2        mask: causal inside each block     positions 0 1 2 0 1 0 1 2
    """
    T = segments.shape[1]
    idx = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    causal = idx[:, :, None] >= idx[:, None, :]
    mask = causal & (segments[:, :, None] == segments[:, None, :])
    return mask[:, None], idx - first


def document_attention(x: torch.Tensor, eot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment attention for packed pretraining rows, where each document ends with end-of-text
    (which belongs to the document it ends):

        row       a a a E b b b E c      segments 0 0 0 0 1 1 1 1 2
    """
    is_eot = x == eot
    return segment_attention(torch.cumsum(is_eot, dim=1) - is_eot.long())
