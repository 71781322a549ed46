"""The target's (and a draft's) linear layers on a CPU for blocks of 1 to 3 rows: plain decoding, a verify
of one or two drafts and a draft's own one-token steps, what pays on a CPU.

PyTorch computes such a product as `x @ W.T`, and with MKL on some CPUs those shapes take paths that read
the weights far slower than the machine can: on an AMD EPYC (SmolLM2-135M's float32 linears, every weight
read from memory, one thread) all the products of 1 row take 33 ms, of 2 rows 49 ms and of 3 rows 63 ms,
while the same products computed as `W @ x.T` take 24 ms for 1 row (as two copies of it: the
matrix-vector path is the slow one) and for 2, and 33 ms for 3. With two threads the matrix-vector
product still runs on one (33 ms) while W @ x.T of 2 rows takes 15 ms: left alone, plain decoding would
be handicapped against any verify. On Qwen3-4B's shapes W @ x.T wins at 2 and 3 rows too (1.2x to
1.7x) and loses from 4 rows on, so only blocks of 1 to 3 rows may take it; `bench/verify_cost.py` times
both forms on the machine at hand.

`multiply_rows_first(model)` times both forms over the model's own weights (up to `MEASURED_BYTES` of
them, more than a CPU's caches hold, so they stream from memory as in a forward) for each block size and
gives every float32 `nn.Linear` W @ x.T at the sizes where it takes under `PAYS_BELOW` of F.linear's
time. A small model's weights stay in cache, where F.linear is the faster form (stories260k: about 2x),
so it keeps it. Anything else (longer blocks, a prefill, another device or dtype) stays F.linear. The two
forms sum in a different order, so they agree to float32 rounding, as F.linear itself does across block
sizes.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ROWS_FIRST = (1, 2, 3)  # block sizes (rows of the flattened input) that may be computed as W @ x.T
MEASURED_BYTES = 256 * 2**20  # weights timed when deciding
# W @ x.T must take under this share of F.linear's time to be used: near-ties keep F.linear. (At 0.9,
# SmolLM2's one-row products, which time at 0.88 to 0.91 of F.linear's, were taken by one load and not
# by the next, and a plain step went from 36 to 39 ms between runs of one bench.)
PAYS_BELOW = 0.95


def rows_first_product(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """rows @ weight.T [n, out] computed as weight @ rows.T: the block made contiguous rows, then
    transposed as a view (MKL reads that operand fastest), a single row as two copies of it (the
    matrix-vector path is the slow one); the result contiguous rows again."""
    block = rows.expand(2, -1) if rows.shape[0] == 1 else rows
    return torch.mm(weight, block.contiguous().t()).t()[: rows.shape[0]].contiguous()


class RowsFirstLinear(nn.Linear):
    """`nn.Linear` that computes blocks of `rows_first` rows on a CPU as W @ x.T (same weights, same state
    dict; `multiply_rows_first` swaps a layer's class to this one and sets `rows_first`)."""

    rows_first: frozenset[int] = frozenset(ROWS_FIRST)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (
            rows not in self.rows_first
            or not x.is_cpu
            or x.dtype != torch.float32
            or self.weight.dtype != x.dtype
        ):
            return F.linear(x, self.weight, self.bias)
        product = rows_first_product(self.weight, x.reshape(rows, self.in_features))
        if self.bias is not None:
            product = product + self.bias
        return product.reshape(*x.shape[:-1], self.out_features)


def product_times(linears: list[nn.Linear], rows: int, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of one pass of products over these layers' weights by a block of `rows` rows, as
    `F.linear` and as `rows_first_product`, timed alternately after a warm pass (blocks of ones: any
    values time the same, and the global random state is left alone)."""
    block = {m.in_features: torch.ones(rows, m.in_features) for m in linears}
    forms = (lambda w, x: F.linear(x, w), lambda w, x: rows_first_product(w, x))  # looked up when called
    times: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        for repeat in range(repeats + 1):
            for form, kept in zip(forms, times, strict=True):
                began = time.perf_counter()
                for m in linears:
                    form(m.weight, block[m.in_features])
                if repeat:
                    kept.append(time.perf_counter() - began)
    return statistics.median(times[0]), statistics.median(times[1])


def rows_first_pays(linears: list[nn.Linear], repeats: int = 3) -> frozenset[int]:
    """The block sizes of `ROWS_FIRST` at which W @ x.T (two copies of a single row) takes under
    `PAYS_BELOW` of `F.linear`'s time over these layers' weights (the first `MEASURED_BYTES` of them) on
    this machine."""
    sample, size = [], 0
    for m in linears:
        if size >= MEASURED_BYTES:
            break
        sample.append(m)
        size += m.weight.nbytes
    pays = set()
    for rows in ROWS_FIRST:
        linear, rows_first = product_times(sample, rows, repeats)
        if rows_first < PAYS_BELOW * linear:
            pays.add(rows)
        log.info(
            "products of %d rows over %.1f MB of weights: x @ W.T %.1f ms, W @ x.T %.1f ms",
            rows,
            size / 2**20,
            linear * 1e3,
            rows_first * 1e3,
        )
    return frozenset(pays)


def cpu_float32_linears(model: nn.Module) -> list[nn.Linear]:
    """The layers `multiply_rows_first` may change: plain `nn.Linear` (or already `RowsFirstLinear`) with
    float32 weights on a CPU."""
    return [
        m
        for m in model.modules()
        if type(m) in (nn.Linear, RowsFirstLinear) and m.weight.is_cpu and m.weight.dtype == torch.float32
    ]


def multiply_rows_first(model: nn.Module, sizes: Iterable[int] | None = None) -> int:
    """Make every float32 `nn.Linear` of `model` on a CPU a `RowsFirstLinear` for the block sizes where
    `rows_first_pays` (or for `sizes`); returns how many changed (none when no size pays). Subclasses of
    `nn.Linear` (quantized or adapted layers) keep their own forward."""
    linears = cpu_float32_linears(model)
    chosen = frozenset(sizes) if sizes is not None else rows_first_pays(linears) if linears else frozenset()
    if linears and sizes is None:
        log.info("%s multiplies blocks of %s rows as W @ x.T", type(model).__name__, sorted(chosen) or "no")
    if not linears or not chosen:
        return 0
    for m in linears:
        m.__class__ = RowsFirstLinear
        m.rows_first = chosen
    return len(linears)


def multiply_as_f_linear(model: nn.Module) -> int:
    """Undo `multiply_rows_first`: each `RowsFirstLinear` of `model` back to `nn.Linear`; returns how many."""
    changed = 0
    for module in model.modules():
        if type(module) is RowsFirstLinear:
            module.__class__ = nn.Linear
            module.__dict__.pop("rows_first", None)
            changed += 1
    return changed


def rows_first_sizes(model: nn.Module) -> frozenset[int]:
    """The block sizes `model`'s linears compute as W @ x.T (none if it keeps F.linear)."""
    return next((m.rows_first for m in model.modules() if type(m) is RowsFirstLinear), frozenset())
