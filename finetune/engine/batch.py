"""The engine's running requests and their KV cache, row for row: a prefilled request joins as the
last row (its one-row cache stacked under the others, left-padded to a common length) and finished
ones leave at once, their rows freed and the columns only padding still uses dropped. The mask it
keeps hides each row's left padding, so a row computes what it would alone."""

from __future__ import annotations

import torch

from .decoder import KV
from .requests import Request


class Batch:
    """The running requests and their KV cache: row i of the cache is rows[i]."""

    def __init__(self) -> None:
        self.rows: list[Request] = []
        self.kv: KV | None = None
        self.mask: torch.Tensor | None = None  # [rows, length], False on left padding
        self.padded = False  # some row has padding (else the mask can be left out)

    @property
    def length(self) -> int:
        return 0 if self.kv is None else self.kv.length

    def join(self, request: Request, kv: KV) -> None:
        """Add a prefilled request (its own one-row cache) as the last row."""
        mask = torch.ones(1, kv.length, dtype=torch.bool, device=kv.keys[0].device)
        if not self.rows:
            self.rows, self.kv, self.mask, self.padded = [request], kv, mask, False
            return
        assert self.mask is not None and self.kv is not None
        total = max(self.length, kv.length)
        self.mask = torch.cat([pad_left(self.mask, total - self.length), pad_left(mask, total - kv.length)])
        self.kv = KV.stack([self.kv, kv])
        self.padded = not bool(self.mask.all())
        self.rows.append(request)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows; drop the columns that are padding in every remaining row."""
        if len(rows) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in rows]
        if not rows:
            self.kv, self.mask = None, None
            return
        assert self.mask is not None and self.kv is not None
        mask = self.mask.index_select(0, torch.tensor(rows, device=self.mask.device))
        start = int(mask.any(dim=0).int().argmax())  # the first column some row still uses
        self.mask = mask[:, start:]
        self.kv = self.kv.rows_of(rows, start)
        self.padded = not bool(self.mask.all())


def pad_left(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Pad a mask's columns with n False on the left."""
    return mask if n == 0 else torch.cat([mask.new_zeros(mask.shape[0], n), mask], dim=1)
