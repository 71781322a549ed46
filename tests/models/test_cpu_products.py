"""The target's linear layers on a CPU (`models.cpu_products`): blocks of 1..3 rows are computed as W @ x.T
(one row as two copies of it) at the sizes timing chose, equal to `F.linear` to rounding, and nothing else
changes."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from support import tiny
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from deepspec.models import cpu_products
from deepspec.models.cpu_products import (
    ROWS_FIRST,
    RowsFirstLinear,
    multiply_as_f_linear,
    multiply_rows_first,
    rows_first_sizes,
)
from deepspec.models.drafts import eagle3, load_draft
from deepspec.models.drafts.eagle3 import Eagle3Config, Eagle3Draft
from deepspec.models.target import TargetRunner, load_target


class WeightLeftProducts(TorchDispatchMode):
    """Counts the matrix products whose left operand is `weight` (the rows-first form)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight, self.count = weight, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default and args[0].data_ptr() == self.weight.data_ptr():
            self.count += 1
        return func(*args, **(kwargs or {}))


def rows_first_layer(bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=bias)
    assert multiply_rows_first(layer, ROWS_FIRST) == 1
    return layer


SHAPES = [(1, 48), (2, 48), (3, 48), (1, 2, 48), (1, 3, 48), (2, 1, 48), (4, 48), (1, 9, 48)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_products_equal_f_linear(shape, bias):
    layer = rows_first_layer(bias)
    x = torch.randn(*shape)
    got = layer(x)
    assert got.shape == (*shape[:-1], 80) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_a_transposed_input_gives_its_own_rows():
    layer = rows_first_layer(bias=True)
    x = torch.randn(48, 2).t()  # rows that are not contiguous in memory
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8])
def test_only_blocks_of_rows_first_sizes_take_the_weight_on_the_left(rows):
    layer = rows_first_layer(bias=False)
    with WeightLeftProducts(layer.weight) as products:
        layer(torch.randn(1, rows, 48))
    assert products.count == (1 if rows in ROWS_FIRST else 0)


def test_other_dtypes_keep_f_linear():
    layer = rows_first_layer(bias=False).to(torch.float64)
    with WeightLeftProducts(layer.weight) as products:
        layer(torch.randn(2, 48, dtype=torch.float64))
    assert products.count == 0


class Adapted(nn.Linear):
    """A subclass of nn.Linear with its own forward, which must be kept."""


def test_only_float32_cpu_linears_change():
    model = nn.ModuleDict(
        {
            "plain": nn.Linear(4, 4),
            "bf16": nn.Linear(4, 4).to(torch.bfloat16),
            "adapted": Adapted(4, 4),
            "embedding": nn.Embedding(10, 4),
        }
    )
    keys = set(model.state_dict())
    assert multiply_rows_first(model, ROWS_FIRST) == 1
    assert type(model["plain"]) is RowsFirstLinear and isinstance(model["plain"], nn.Linear)
    assert type(model["bf16"]) is nn.Linear and type(model["adapted"]) is Adapted
    assert set(model.state_dict()) == keys
    assert multiply_rows_first(model, [2]) == 1 and model["plain"].rows_first == {2}  # sizes set again


@pytest.mark.parametrize("pays", [False, True])
def test_load_target_multiplies_rows_first_where_it_pays(assets_dir, monkeypatch, pays):
    monkeypatch.setattr(cpu_products, "rows_first_pays", lambda linears: frozenset({2} if pays else ()))
    model, _ = load_target(str(assets_dir / "models" / "stories260k"))
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Linear)}
    assert kinds == ({RowsFirstLinear} if pays else {nn.Linear})


def slowed(product):
    def slow(*args):
        time.sleep(2e-3)
        return product(*args)

    return slow


def test_the_decision_follows_the_timing(stories260k, monkeypatch):
    """Over the real weights, whichever form is slowed loses."""
    model, _ = stories260k
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    monkeypatch.setattr(cpu_products, "rows_first_product", slowed(cpu_products.rows_first_product))
    assert not cpu_products.rows_first_pays(linears, repeats=1)
    monkeypatch.undo()
    monkeypatch.setattr(F, "linear", slowed(F.linear))
    assert cpu_products.rows_first_pays(linears, repeats=1) == frozenset(ROWS_FIRST)


def test_a_clear_win_pays_and_a_near_tie_does_not(monkeypatch):
    """The rule on measured times: SmolLM2's one-row products, whose W @ x.T times at 0.88 to 0.91 of
    F.linear's on this machine (0.91 here), take W @ x.T; a form within 5% of F.linear's time does not."""
    times = {1: (16.0e-3, 14.6e-3), 2: (24.9e-3, 15.6e-3), 3: (20.0e-3, 19.4e-3)}
    monkeypatch.setattr(cpu_products, "product_times", lambda linears, rows, repeats: times[rows])
    assert cpu_products.rows_first_pays([nn.Linear(4, 4)]) == frozenset({1, 2})


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_a_layer_takes_w_x_t_only_at_the_sizes_that_pay(monkeypatch, rows):
    monkeypatch.setattr(cpu_products, "rows_first_pays", lambda linears: frozenset({2}))
    layer = nn.Linear(48, 80)
    assert multiply_rows_first(layer) == 1
    x = torch.randn(rows, 48)
    with WeightLeftProducts(layer.weight) as products:
        y = layer(x)
    assert products.count == (rows == 2)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_verify_through_rows_first_products_gives_the_target_logits(stories260k):
    """On the real target, a 2-token verify's logits through rows-first products equal those of the same
    weights through F.linear."""
    model, _ = stories260k
    loaded = rows_first_sizes(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        multiply_rows_first(model, ROWS_FIRST)
        assert linears and all(type(m) is RowsFirstLinear for m in linears)
        ids = torch.randint(0, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(0))
        runner = TargetRunner(model, [0])
        runner.extend(ids[:10], features=False)
        with WeightLeftProducts(model.lm_head.weight) as products:
            got = runner.extend(ids[10:]).logits
        assert products.count == 1
        multiply_as_f_linear(model)
        runner.rollback(10)
        want = runner.extend(ids[10:]).logits
    finally:  # the module's target as it was loaded
        multiply_as_f_linear(model)
        multiply_rows_first(model, loaded)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pays", [False, True])
def test_load_draft_multiplies_rows_first_where_it_pays(tmp_path, monkeypatch, pays):
    """A draft loaded for decoding on a CPU takes the target's decision over its own weights, and its chain
    stays the one F.linear gives, to rounding."""
    chosen = frozenset(ROWS_FIRST if pays else ())
    monkeypatch.setattr(cpu_products, "rows_first_pays", lambda linears: chosen)
    torch.manual_seed(0)
    cfg = Eagle3Config.from_target(tiny.qwen3(), layer_ids=[0, 1, 3], ttt_steps=3)
    embed, head = torch.randn(cfg.vocab_size, cfg.hidden_size), torch.randn(cfg.vocab_size, cfg.hidden_size)
    eagle3.save(Eagle3Draft(cfg, embed, head), tmp_path)
    draft = load_draft(tmp_path, embed, head)
    kinds = {type(m) for m in draft.modules() if isinstance(m, nn.Linear)}
    assert kinds == ({RowsFirstLinear} if pays else {nn.Linear})
    ids, features = torch.randint(0, cfg.vocab_size, (6,)), torch.randn(6, 3 * cfg.hidden_size)
    with WeightLeftProducts(draft.fc.weight) as products:
        got = draft.draft_logits(features, 7, context_ids=ids)
    assert products.count == 0  # step 0 projects the 6 context positions at once: F.linear
    with WeightLeftProducts(draft.lm_head.weight) as products:
        draft.draft_logits(features[:1], 7, context_ids=ids[:1])
    assert products.count == (3 if pays else 0)  # one row a step, each through the head
    multiply_as_f_linear(draft)
    torch.testing.assert_close(got, draft.draft_logits(features, 7, context_ids=ids), atol=1e-5, rtol=1e-5)
