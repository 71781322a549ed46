"""The target's linear layers on a CPU for blocks of a few rows, the shape of a speculative verify.

A verify multiplies every weight of the target by a block of 2 or 3 rows (the anchor and one or two
drafts, what pays on a CPU). PyTorch computes `x @ W.T`, and with MKL on some CPUs that shape takes a
path that reads the weights far slower than it can: on an AMD EPYC (one thread, SmolLM2-135M's float32
linears, every weight read from memory) all the products of 1 row take 32 ms, of 2 rows 49 ms and of 3
rows 63 ms, while the same products computed as `W @ x.T` take 23 ms and 32 ms. On Qwen3-4B's shapes the
second form wins at 2 and 3 rows too (1.2x to 1.7x) and loses from 4 rows on, so only those block sizes
take it; `bench/verify_cost.py` times both on the machine at hand.

`multiply_rows_first(model)` gives every float32 `nn.Linear` of a model that form for 2..3 rows on a
CPU, when it pays there: it times both forms over the model's own weights (up to `MEASURED_BYTES` of them,
more than a CPU's caches hold, so they stream from memory as in a forward) and keeps `F.linear` unless
W @ x.T takes under `PAYS_BELOW` of its time. A small model's weights stay in cache, where `F.linear` is
the faster form (stories260k: about 2x), so it keeps it. Anything else (one row, longer blocks, a
prefill, another device or dtype) stays `F.linear`. The two forms sum in a different order, so they
agree to float32 rounding, as `F.linear` itself does across block sizes.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ROWS_FIRST = range(2, 4)  # block sizes (rows of the flattened input) computed as W @ x.T
MEASURED_BYTES = 256 * 2**20  # weights timed when deciding
PAYS_BELOW = 0.9  # W @ x.T must take under this share of F.linear's time to be used


def rows_first_product(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """rows @ weight.T [n, out] computed as weight @ rows.T, the block made contiguous rows first and then
    transposed as a view (MKL reads that operand fastest), the result contiguous rows again."""
    return torch.mm(weight, rows.contiguous().t()).t().contiguous()


class RowsFirstLinear(nn.Linear):
    """`nn.Linear` that computes blocks of `ROWS_FIRST` rows on a CPU as W @ x.T (same weights, same state
    dict; `multiply_rows_first` swaps a layer's class to this one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows not in ROWS_FIRST or not x.is_cpu or x.dtype != torch.float32 or self.weight.dtype != x.dtype:
            return F.linear(x, self.weight, self.bias)
        product = rows_first_product(self.weight, x.reshape(rows, self.in_features))
        if self.bias is not None:
            product += self.bias
        return product.reshape(*x.shape[:-1], self.out_features)


def rows_first_pays(linears: list[nn.Linear], repeats: int = 3) -> bool:
    """Whether W @ x.T beats `F.linear` on blocks of `ROWS_FIRST` rows over these layers' weights (the
    first `MEASURED_BYTES` of them), timed alternately on this machine, median of `repeats` passes."""
    sample, size = [], 0
    for m in linears:
        if size >= MEASURED_BYTES:
            break
        sample.append(m)
        size += m.weight.nbytes
    # any values time the same; ones leave the global random state alone
    blocks = [{m.in_features: torch.ones(rows, m.in_features) for m in sample} for rows in ROWS_FIRST]
    forms = {"x @ W.T": lambda w, x: F.linear(x, w), "W @ x.T": lambda w, x: rows_first_product(w, x)}
    times: dict[str, list[float]] = {name: [] for name in forms}
    with torch.no_grad():
        for repeat in range(repeats + 1):  # the first pass warms up
            for name, form in forms.items():
                began = time.perf_counter()
                for block in blocks:
                    for m in sample:
                        form(m.weight, block[m.in_features])
                if repeat:
                    times[name].append(time.perf_counter() - began)
    linear, rows_first = (statistics.median(times[name]) for name in forms)
    pays = rows_first < PAYS_BELOW * linear
    log.info(
        "products of %s rows over %.1f MB of weights: x @ W.T %.1f ms, W @ x.T %.1f ms; the target uses %s",
        "/".join(map(str, ROWS_FIRST)),
        size / 2**20,
        linear * 1e3,
        rows_first * 1e3,
        "W @ x.T" if pays else "x @ W.T",
    )
    return pays


def multiply_rows_first(model: nn.Module, *, measure: bool = True) -> int:
    """Make every float32 `nn.Linear` of `model` on a CPU a `RowsFirstLinear`, if `rows_first_pays` for
    them (or unconditionally without `measure`); returns how many changed. Subclasses of `nn.Linear`
    (quantized or adapted layers) keep their own forward."""
    linears = [
        m
        for m in model.modules()
        if type(m) is nn.Linear and m.weight.is_cpu and m.weight.dtype == torch.float32
    ]
    if not linears or (measure and not rows_first_pays(linears)):
        return 0
    for m in linears:
        m.__class__ = RowsFirstLinear
    return len(linears)


def multiply_as_f_linear(model: nn.Module) -> int:
    """Undo `multiply_rows_first`: each `RowsFirstLinear` of `model` back to `nn.Linear`; returns how many."""
    changed = 0
    for module in model.modules():
        if type(module) is RowsFirstLinear:
            module.__class__ = nn.Linear
            changed += 1
    return changed
