"""What the unified model hands between its experts and to its callers: the DiT conditioning the connector
produces (:class:`Conditioning`) and the LM's sampled completions (:class:`TextSamples`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Conditioning", "TextSamples"]


@dataclass
class Conditioning:
    """DiT conditioning: connector output and its key mask (1 = attend)."""

    hidden: torch.Tensor  # (B, N, d_caption)
    mask: torch.Tensor  # (B, N)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def zeroed(self) -> Conditioning:
        """The CFG "unconditional" conditioning: the connector output set to zero."""
        return Conditioning(torch.zeros_like(self.hidden), self.mask)

    def keep(self, keep: torch.Tensor) -> Conditioning:
        """Zero the samples where ``keep`` (B,) is 0 (condition dropout)."""
        return Conditioning(self.hidden * keep.view(-1, 1, 1).to(self.hidden.dtype), self.mask)

    def repeat_interleave(self, n: int) -> Conditioning:
        return Conditioning(self.hidden.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0))

    def index(self, idx: torch.Tensor | slice | Sequence[int]) -> Conditioning:
        return Conditioning(self.hidden[idx], self.mask[idx])

    def detach(self) -> Conditioning:
        return Conditioning(self.hidden.detach(), self.mask)

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        return Conditioning(torch.cat([c.hidden for c in items]), torch.cat([c.mask for c in items]))


@dataclass
class TextSamples:
    """Sampled completions: text (EOS removed), ids up to and including the first EOS, and whether EOS came."""

    texts: list[str]
    completion_ids: list[list[int]]
    finished: list[bool]
