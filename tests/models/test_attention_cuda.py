"""The packed blocks' attention on CUDA against the CPU path (skipped without a CUDA device): chunk masks
built on the device, `DFlashAttention` in float32 (output and every gradient), flex attention's mask and
output; then the bf16 variants bench/gpu_train.py times (chunked SDPA, one SDPA call, flex) against float32.
They need no installed deepspec: bench/gpu_train.py's import shim loads models/, so on a device machine

    python3 -m pytest -q tests/models/test_attention_cuda.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def gpu_train():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_train as module

        module.import_deepspec(force_shim=False)
        yield module
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_chunk_masks_built_on_cuda_equal_the_cpu_ones(gpu_train):
    from deepspec.models.drafts.dflash import attention_chunks

    cpu = gpu_train.random_packed([100, 60], 10, 12, 8, seed=1)  # two sequences, 24 blocks of 8
    cuda = cpu.to("cuda")
    for rows in (None, 24, 1024):  # one call; chunks across the sequences; the model's chunk
        on_cpu, on_cuda = attention_chunks(cpu, rows), attention_chunks(cuda, rows)
        assert [(c.queries, c.context, c.blocks) for c in on_cuda] == [
            (c.queries, c.context, c.blocks) for c in on_cpu
        ]
        for c, d in zip(on_cpu, on_cuda, strict=True):
            assert d.mask.is_cuda and torch.equal(d.mask.cpu(), c.mask)


def test_attention_on_cuda_equals_the_cpu_path_in_float32(gpu_train):
    record = gpu_train.parity_phase(torch.device("cuda"), compile_flex=False)
    assert record["chunk_masks_equal"]
    assert max(record["module_max_abs_diff"].values()) <= gpu_train.FP32_TOL, record["module_max_abs_diff"]
    assert record["chunked_sdpa_vs_module"] <= gpu_train.FP32_TOL
    if record["flex"].get("status") != "skipped":  # eager flex: its mask at every (query, key), its output
        assert record["flex"]["token_mask_equal"]
        assert record["flex"]["output_max_abs_diff"] <= gpu_train.FP32_TOL
    assert record["ok"]


@pytest.mark.slow
def test_compiled_flex_attention_on_cuda_equals_the_cpu_path(gpu_train):
    if gpu_train.flex_api()[0] is None:
        pytest.skip(gpu_train.flex_api()[2])
    record = gpu_train.parity_phase(torch.device("cuda"), compile_flex=True)
    assert record["flex"]["token_mask_equal"] and record["flex"]["compiled"]
    assert record["flex"]["output_max_abs_diff"] <= gpu_train.FP32_TOL


@pytest.mark.parametrize("compile_flex", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("block", [8, 7])
def test_bf16_attention_variants_match_float32_with_gradients(gpu_train, block, compile_flex):
    args = gpu_train.parse_args(["--cpu-check"])  # the tiny shape, 2 timed calls
    args.compile = compile_flex
    record = gpu_train.attention_one(args, block, torch.device("cuda"), {})
    names = {"sdpa_chunked", "sdpa_one_call"}
    if gpu_train.flex_api()[0] is not None:
        names.add("flex_compiled" if compile_flex else "flex_eager")
    assert set(record["variants"]) == names
    for name, variant in record["variants"].items():
        assert variant.get("status") is None, (name, variant.get("error"))
        assert set(variant["rel_err"]) == {"out", "dq", "dk", "dv"}  # gradients too, on CUDA
        assert variant["ok"], (name, variant["rel_err"])
        assert variant["forward_backward_s"] > 0 and variant["peak_gib"] is not None
