"""The targets' attention while decoding (`models.attention`): folded query heads give transformers' `sdpa`
outputs for verify blocks over a cache, single rows and padded batches alike, without copying key heads."""

from __future__ import annotations

import pytest
import torch
from support import tiny
from transformers import AutoModelForCausalLM, DynamicCache

from deepspec.models.attention import MAX_PACKED_QUERY, PACKED_GQA_SDPA

CONFIGS = {"llama": tiny.llama, "qwen3": tiny.qwen3, "gemma3": tiny.gemma3}


def random_target(name: str):
    torch.manual_seed(0)
    config = CONFIGS[name](hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@torch.no_grad()
def verify_logits(model, implementation: str, ids: torch.Tensor, mask: torch.Tensor, prefix: int):
    """Logits of the positions after `prefix`, run as one block over the cache of the prefix."""
    model.set_attn_implementation(implementation)
    cache = DynamicCache()
    model(input_ids=ids[:, :prefix], attention_mask=mask[:, :prefix], past_key_values=cache, use_cache=True)
    return model(input_ids=ids[:, prefix:], attention_mask=mask, past_key_values=cache, use_cache=True).logits


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("block", [1, 2, 5, MAX_PACKED_QUERY + 3])
def test_verify_blocks_attend_as_transformers_sdpa(name, block):
    model = random_target(name)
    ids = torch.randint(0, 50, (2, 30 + block))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # a left-padded row, as a batched verify holds shorter requests
    want = verify_logits(model, "sdpa", ids, mask, prefix=30)
    got = verify_logits(model, PACKED_GQA_SDPA, ids, mask, prefix=30)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    eager = verify_logits(model, "eager", ids, mask, prefix=30)  # and both are attention as written
    torch.testing.assert_close(got[0], eager[0], atol=2e-5, rtol=1e-5)


def key_heads_seen(model, implementation: str, monkeypatch, block: int) -> set[int]:
    """Key heads of every SDPA call a verify block of `block` positions makes."""
    seen: set[int] = set()
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        seen.add(key.shape[1])
        return sdpa(query, key, value, *args, **kwargs)

    ids = torch.randint(0, 50, (1, 20 + block))
    model.set_attn_implementation(implementation)
    cache = DynamicCache()
    model(input_ids=ids[:, :20], past_key_values=cache, use_cache=True)
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        model(input_ids=ids[:, 20:], past_key_values=cache, use_cache=True)
    return seen


@torch.no_grad()
def test_verify_blocks_attend_the_stored_key_heads(monkeypatch):
    model = random_target("qwen3")  # 6 query heads on 2 key heads
    assert key_heads_seen(model, PACKED_GQA_SDPA, monkeypatch, block=4) == {2}
    assert key_heads_seen(model, "sdpa", monkeypatch, block=4) == {6}  # transformers copies them 3 times
    assert key_heads_seen(model, PACKED_GQA_SDPA, monkeypatch, block=MAX_PACKED_QUERY + 1) == {6}


def test_load_target_decodes_with_folded_heads(stories260k):
    model, _ = stories260k
    assert model.config._attn_implementation == PACKED_GQA_SDPA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_verify_blocks_attend_as_transformers_sdpa_on_cuda():
    model = random_target("qwen3").to("cuda")
    ids = torch.randint(0, 50, (2, 36), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    want = verify_logits(model, "sdpa", ids, mask, prefix=30)
    got = verify_logits(model, PACKED_GQA_SDPA, ids, mask, prefix=30)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
