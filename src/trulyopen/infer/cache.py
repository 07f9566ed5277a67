"""A key-value cache allocated once, one row ("slot") per running request.

    slot 0  k k k k k k k . . . .      every layer holds keys and values as
    slot 1  k k k . . . . . . . .      [slots, kv_heads, max_len, head_dim]
    slot 2  k k k k k k k k k . .      a request writes at its own position:
    slot 3  . . . . . . . . . . .      no concatenation, no reallocation per token

Running requests always occupy slots 0..n-1: when one leaves, the last one's rows are moved into
its place (one copy per finished request), so a decode step attends over the view [:n, :, :L] of
the cache without gathering it. Transformers' attention layers call `update(key, value, layer)`
and attend over what it returns; the engine passes the matching 4D attention mask, so the model
itself needs no knowledge of slots. Layers are allocated when they first write, with the shapes
and dtype the model gives (so grouped-query and multi-head latent attention both fit).
"""

from __future__ import annotations

import torch


class SlotCache:
    def __init__(self, slots: int, max_len: int):
        self.slots, self.max_len = slots, max_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # what the next forward writes: rows [first, first + rows) at `positions` (a prefill writes
        # positions 0..T-1 of new rows, a decode step one position per running row)
        self.first, self.rows, self.positions, self.span = 0, 0, None, 0
        self._flat: tuple[int, torch.Tensor] | None = None  # (heads, row of each (slot, head))

    # --- set by the engine before each forward
    def prefill(self, first: int, rows: int, length: int) -> None:
        self.first, self.rows, self.positions, self.span = first, rows, None, length
        self._flat = None

    def decode(self, positions: torch.Tensor, span: int) -> None:
        """Row i of the running batch (slot i) writes at positions[i]; attention sees [:span]."""
        self.first, self.rows, self.positions, self.span = 0, len(positions), positions, span
        self._flat = None

    # --- called by the model's attention layers
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.keys):
            B, H, _, _ = key.shape
            self.keys.append(key.new_zeros((self.slots, H, self.max_len, key.shape[-1])))
            self.values.append(value.new_zeros((self.slots, value.shape[1], self.max_len, value.shape[-1])))
        k, v = self.keys[layer_idx], self.values[layer_idx]
        rows = slice(self.first, self.first + self.rows)
        if self.positions is None:  # prefill: the whole (padded) prompt of each new row
            T = key.shape[2]
            k[rows, :, :T], v[rows, :, :T] = key, value
        else:  # one position per slot: seen as rows of [slots * heads * max_len, head_dim]
            flat = self._flat_rows(k.shape[1])
            k.view(-1, k.shape[-1]).index_copy_(0, flat, key.reshape(-1, key.shape[-1]))
            v.view(-1, v.shape[-1]).index_copy_(0, flat, value.reshape(-1, value.shape[-1]))
        return k[rows, :, : self.span], v[rows, :, : self.span]

    def _flat_rows(self, heads: int) -> torch.Tensor:
        """Where (slot i, head h) writes at positions[i] in the flattened cache; computed once per
        step, as every layer (with the same number of heads) writes at the same places."""
        if self._flat is None or self._flat[0] != heads:
            slot_head = torch.arange(self.rows, device=self.positions.device)[:, None] * heads
            slot_head = slot_head + torch.arange(heads, device=self.positions.device)
            self._flat = (heads, (slot_head * self.max_len + self.positions[:, None]).reshape(-1))
        return self._flat[1]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` positions into slot dst (compaction after a finish)."""
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    # transformers asks these of any cache object it is given
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    is_compileable = False
