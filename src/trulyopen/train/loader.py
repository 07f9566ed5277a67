"""The deterministic loader: which tokens make up global batch N is a pure function of
(seed, data fingerprint, N), whatever the number of processes or data workers.

    shards (docs with end-of-text after each, concatenated)  ─►  one token stream per split
    stream cut into sequences of seq_len + 1 tokens           ─►  sequence k = stream[k*(L+1) : (k+1)*(L+1)]
    epoch e: permutation of all sequences, seeded by (seed, fingerprint, e)
    global batch n = the next `batch` sequences of that order; rank r of w takes rows r::w

So any batch can be looked up later (`trulyopen inspect batch`), a checkpoint only needs the step
to know the loader's position, and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trulyopen.errors import UserError


class DataMismatchError(UserError):
    """A checkpoint's data fingerprint differs from the run's shards."""


@dataclass(frozen=True)
class Shard:
    name: str
    tokens: np.ndarray  # memory map
    offsets: np.ndarray  # document k is tokens[offsets[k]:offsets[k+1]]
    ids: list[str]


class TokenStream:
    """All shards of one split as one read-only token sequence, read through memory maps."""

    def __init__(self, shard_dir: Path, split: str):
        meta = json.loads((shard_dir / "shards.json").read_text())
        self.fingerprint: str = meta["fingerprint"]
        self.eot_id: int = meta["eot_id"]
        self.vocab_size: int = meta["vocab_size"]
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.shards: list[Shard] = []
        for s in meta["splits"][split]["shards"]:
            tokens = np.memmap(shard_dir / f"{s['name']}.bin", dtype=dtype, mode="r")
            offsets = np.fromfile(shard_dir / f"{s['name']}.idx", dtype="<i8")
            ids = (shard_dir / f"{s['name']}.ids").read_text(encoding="utf-8").splitlines()
            self.shards.append(Shard(s["name"], tokens, offsets, ids))
        self.starts = np.cumsum([0] + [len(s.tokens) for s in self.shards])  # stream position of each shard

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """stream[start:stop] as int64, crossing shard boundaries as needed."""
        out = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            local = start - self.starts[k]
            take = min(stop - start, len(self.shards[k].tokens) - local)
            out.append(np.asarray(self.shards[k].tokens[local : local + take], dtype=np.int64))
            start += take
            k += 1
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def documents(self, start: int, stop: int) -> list[tuple[str, int, int]]:
        """(document id, first, last+1 stream position) of every document overlapping [start, stop)."""
        found = []
        for k, shard in enumerate(self.shards):
            base = int(self.starts[k])
            if base >= stop or base + len(shard.tokens) <= start:
                continue
            lo = max(int(np.searchsorted(shard.offsets, start - base, side="right")) - 1, 0)
            hi = int(np.searchsorted(shard.offsets, stop - base, side="left"))
            for d in range(lo, min(hi, len(shard.ids))):
                found.append((shard.ids[d], base + int(shard.offsets[d]), base + int(shard.offsets[d + 1])))
        return found


def _epoch_seed(seed: int, fingerprint: str, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{fingerprint}:{epoch}".encode()).digest()[:8], "little")


class BatchPlan:
    """The order of training sequences and where each global batch comes from."""

    def __init__(self, stream: TokenStream, seq_len: int, batch: int, seed: int):
        self.stream, self.seq_len, self.batch, self.seed = stream, seq_len, batch, seed
        self.n_seq = len(stream) // (seq_len + 1)
        if self.n_seq < batch:
            raise DataMismatchError(
                f"the training split has {len(stream):,} tokens: fewer than one global batch of "
                f"{batch} sequences of {seq_len + 1} tokens; add data, or lower pretrain.seq_len or "
                "pretrain.global_batch_tokens"
            )
        self.steps_per_epoch = self.n_seq // batch  # the last partial batch of an epoch is dropped
        self._order_cache: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng(_epoch_seed(self.seed, self.stream.fingerprint, epoch))
            self._order_cache = (epoch, rng.permutation(self.n_seq))
        return self._order_cache[1]

    def sequences(self, step: int) -> np.ndarray:
        """Sequence numbers of global batch `step` (0-based), in row order."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[within * self.batch : (within + 1) * self.batch]

    def batch_tokens(self, step: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """(rows, seq_len + 1) tokens of rows lo..hi-1 (default: all) of global batch `step`."""
        L = self.seq_len + 1
        rows = self.sequences(step)[lo:hi]
        return np.stack([self.stream.read(int(s) * L, (int(s) + 1) * L) for s in rows])

    def batch_documents(self, step: int) -> list[list[tuple[str, int, int]]]:
        """For each row of global batch `step`: the documents (id, start, end in the row) it holds."""
        L = self.seq_len + 1
        rows = []
        for s in self.sequences(step):
            start = int(s) * L
            docs = self.stream.documents(start, start + L)
            rows.append([(i, max(a - start, 0), min(b - start, L)) for i, a, b in docs])
        return rows
