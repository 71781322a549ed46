"""Grouped-query SDPA for short query blocks, the target's attention while decoding.

Transformers' `sdpa` attention copies every key and value head `num_key_value_groups` times (`repeat_kv`)
whenever more than one query position comes with a mask: a speculative verify of the anchor and its drafts
over a long cache copies the whole cache once a layer, and that copy grows with the context (on a CPU,
SmolLM2 at 1,500 tokens: about a sixth of a verify's time). A single query position (plain decoding) is
spared it: transformers folds the query heads that share a key head into one head's rows instead.

`packed_gqa_sdpa` folds the same way for any short block: the g query heads sharing a key head become one
head of g * q rows ([b, h_kv, g * q, d], in `repeat_kv`'s head order), the mask is repeated over the g
copies of its rows, and SDPA runs on the key heads as stored. Every other call (long blocks such as a
prefill or a cache build, no mask, no grouping, extras such as position bias or sinks) goes to
transformers' `sdpa` unchanged. `load_target` gives every target loaded with `sdpa` this one instead.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_GQA_SDPA = "deepspec_packed_gqa_sdpa"
# Folding repeats the mask g times; past a few dozen query rows the key copy it saves is small beside
# the attention itself, and a prefill's mask is the larger tensor.
MAX_PACKED_QUERY = 64
# keyword arguments transformers' `sdpa` handles that folding would not (rather than guess, leave them to it)
_UNFOLDED = ("position_bias", "s_aux", "sinks", "softcap")


def packed_gqa_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention output [b, q, h, d] as transformers' `sdpa_attention_forward` computes it, with query
    heads folded onto their key heads for blocks of 2..MAX_PACKED_QUERY positions under a mask."""
    batch, heads, q_len, head_dim = query.shape
    groups = heads // key.shape[1]
    foldable = (
        1 < q_len <= MAX_PACKED_QUERY
        and groups > 1
        and attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1  # one mask shared by every head
        and not any(kwargs.get(name) is not None for name in _UNFOLDED)
    )
    if not foldable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    mask = attention_mask.repeat(1, 1, groups, 1)  # row j * q + t of the fold is query row t
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, key.shape[1], groups * q_len, head_dim),
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        scale=scaling,
    )
    return out.reshape(out.shape[0], heads, q_len, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_GQA_SDPA, packed_gqa_sdpa)
AttentionMaskInterface.register(PACKED_GQA_SDPA, sdpa_mask)  # the masks `sdpa` gets, or none reach it
