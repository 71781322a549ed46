"""The committed context of one sequence, kept as keys and values while a draft decodes it.

A draft reads the target's features of every committed position in every round. Without a cache each
round projects all p of them again (and Eagle3 attends from each to all before it), so a round costs
O(p) projections. Decoding opens a `DecodeCache` (`with draft.decoding():` in `speculative_generate`),
and each round projects only the positions committed since the last one: the context grows by the
anchor and the kept drafts, and never shrinks, because only verified positions enter it.

Keys and values live in buffers that double when full, so extending costs the new rows only, and a
round's own block keys are written past the committed length as scratch (`with_scratch`), so attention
reads one contiguous view with no concatenation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


class GrowingKV:
    """Keys and values [..., heads, n, head_dim] of one attention layer, grown along the position axis."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def _reserve(self, like: torch.Tensor, needed: int) -> None:
        if self.keys is not None and self.keys.shape[-2] >= needed:
            return
        capacity = max(needed, 2 * (0 if self.keys is None else self.keys.shape[-2]), 64)
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        keys, values = like.new_empty(shape), like.new_empty(shape)
        if self.keys is not None:
            keys[..., : self.length, :] = self.keys[..., : self.length, :]
            values[..., : self.length, :] = self.values[..., : self.length, :]
        self.keys, self.values = keys, values

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Commit the keys and values of the next k.shape[-2] positions."""
        n = k.shape[-2]
        self._reserve(k, self.length + n)
        self.keys[..., self.length : self.length + n, :] = k
        self.values[..., self.length : self.length + n, :] = v
        self.length += n

    def committed(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def with_scratch(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The committed keys and values followed by `k`, `v`, which are not committed: the next call
        overwrites them."""
        n = k.shape[-2]
        self._reserve(k, self.length + n)
        self.keys[..., self.length : self.length + n, :] = k
        self.values[..., self.length : self.length + n, :] = v
        return self.keys[..., : self.length + n, :], self.values[..., : self.length + n, :]


@dataclass
class DecodeCache:
    """The context positions 0..length-1 a draft has projected, one `GrowingKV` per attention layer."""

    layers: list[GrowingKV] = field(default_factory=list)
    length: int = 0

    @classmethod
    def for_layers(cls, n: int) -> DecodeCache:
        return cls([GrowingKV() for _ in range(n)])

    def new_positions(self, context_length: int) -> slice:
        """The positions to project before drafting after a context of `context_length` positions."""
        if context_length < self.length:
            raise RuntimeError(
                f"the context shrank from {self.length} to {context_length} positions: a decode cache "
                "holds one sequence, whose committed context only grows"
            )
        return slice(self.length, context_length)


@contextmanager
def decode_session(draft, layers: int) -> Iterator[None]:
    """A draft's `decoding()`: a fresh `DecodeCache` of `layers` layers in `draft._decode_cache` for the
    length of one sequence, gone afterwards (the draft is stateless again)."""
    draft._decode_cache = DecodeCache.for_layers(layers)
    try:
        yield
    finally:
        draft._decode_cache = None
