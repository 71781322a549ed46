"""DFlash draft: masks, chunked attention, anchors, train/inference agreement, frozen target weights,
save/load."""

import math

import pytest
import torch
from support import tiny

from deepspec.models.drafts.dflash import (
    DFlashConfig,
    DFlashDraft,
    PackedBlocks,
    attention_chunks,
    load,
    pack_blocks,
    sample_anchors,
    save,
)
from deepspec.models.errors import ConfigError

torch.set_num_threads(1)


def tiny_draft(target_config, layers=2, block=4, layer_ids=(0, 1)) -> DFlashDraft:
    torch.manual_seed(0)
    cfg = DFlashConfig.from_target(
        target_config, num_layers=layers, block_size=block, layer_ids=list(layer_ids), mask_token_id=3
    )
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size)
    head = torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.1
    return DFlashDraft(cfg, embed, head)


LLAMA, QWEN3 = tiny.llama(layers=3), tiny.qwen3(layers=3)


def random_sequences(n_features: int, hidden: int, lengths=(12, 9)):
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, 50, (t,), generator=gen), torch.randn(t, n_features * hidden, generator=gen))
        for t in lengths
    ]


def test_mask_matches_brute_force_definition():
    seqs = random_sequences(2, 32)
    anchors = [torch.tensor([2, 6, 10]), torch.tensor([0, 4])]
    packed = pack_blocks(seqs, anchors, block_size=3, mask_token_id=3)
    mask = packed.attention_mask()
    rows = [(s, p, k) for s, a in enumerate(anchors) for p in a.tolist() for k in range(3)]
    keys_ctx = [(s, j) for s, (ids, _) in enumerate(seqs) for j in range(ids.shape[0])]
    assert mask.shape == (len(rows), len(keys_ctx) + len(rows))
    for i, (s, p, _) in enumerate(rows):
        for j, (s2, pos) in enumerate(keys_ctx):
            assert mask[i, j].item() == (s == s2 and pos < p), (i, j)
        for j, (s2, p2, _) in enumerate(rows):
            assert mask[i, len(keys_ctx) + j].item() == (s == s2 and p == p2), (i, j)
    assert packed.block_ids.tolist()[:3] == [seqs[0][0][2].item(), 3, 3]
    assert packed.block_positions.tolist()[:3] == [2, 3, 4]


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 5, 7, 100])
def test_chunks_see_every_allowed_key(chunk_rows):
    """Each chunk's narrowed keys hold every key its rows may attend to, and its mask is the full
    mask's restriction to them."""
    seqs = random_sequences(2, 32, lengths=(12, 9, 10))
    packed = pack_blocks(seqs, [torch.tensor([2, 6, 10]), torch.tensor([0, 4]), torch.tensor([7])], 3, 3)
    full = packed.attention_mask()
    n_c = packed.context_features.shape[0]
    chunks = attention_chunks(packed, chunk_rows)
    assert [c.queries.start for c in chunks] == list(range(0, full.shape[0], chunk_rows))
    assert chunks[-1].queries.stop == full.shape[0]
    narrowed = False
    for chunk in chunks:
        keys = torch.cat([torch.arange(n_c)[chunk.context], n_c + torch.arange(full.shape[0])[chunk.blocks]])
        rows = full[chunk.queries]
        assert torch.equal(chunk.mask, rows[:, keys])
        assert rows.sum() == chunk.mask.sum()  # no allowed key left out
        narrowed |= keys.numel() < full.shape[1]
    assert narrowed or chunk_rows >= full.shape[0]


def test_unordered_rows_keep_every_key():
    seqs = random_sequences(2, 32)
    packed = pack_blocks(seqs, [torch.tensor([2, 6]), torch.tensor([4])], 3, 3)
    order = torch.tensor([6, 7, 8, 0, 1, 2, 3, 4, 5])  # the second sequence's block first
    shuffled = PackedBlocks(
        **{
            name: getattr(packed, name)[order] if name.startswith("block_") else getattr(packed, name)
            for name in vars(packed)
        }
    )
    for chunk in attention_chunks(shuffled, 3):
        assert chunk.mask.shape[1] == packed.context_features.shape[0] + order.numel()
        assert torch.equal(chunk.mask, shuffled.attention_mask()[chunk.queries])


@pytest.mark.parametrize("target_config", [LLAMA, QWEN3], ids=["llama", "qwen3"])
def test_chunked_attention_matches_one_call(target_config):
    draft = tiny_draft(target_config)
    seqs = random_sequences(2, 32, lengths=(12, 9, 10))
    packed = pack_blocks(seqs, [torch.tensor([1, 5, 11]), torch.tensor([3, 8]), torch.tensor([0, 6])], 4, 3)
    outputs, grads = [], []
    for rows in (None, 4, 8, 12, 1000):
        draft.zero_grad()
        draft.attention_chunk_rows = rows
        hidden = draft(packed)
        draft.lm_head(hidden).logsumexp(-1).sum().backward()
        outputs.append(hidden.detach())
        grads.append([p.grad.clone() for p in draft.parameters() if p.requires_grad])
    for out, grad in zip(outputs[1:], grads[1:], strict=True):
        torch.testing.assert_close(out, outputs[0], atol=1e-5, rtol=1e-5)
        for g, g0 in zip(grad, grads[0], strict=True):
            torch.testing.assert_close(g, g0, atol=1e-5, rtol=1e-4)


def test_anchors_need_a_supervised_token_and_a_supervised_next_token():
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1, 0, 1])
    allowed = {2, 3, 6}  # 1: prompt token; 4, 7: next token unsupervised; 9: no next token
    for seed in range(20):
        anchors = sample_anchors(mask, 2, torch.Generator().manual_seed(seed))
        assert len(anchors) == 2 and set(anchors.tolist()) <= allowed
        assert anchors.tolist() == sorted(set(anchors.tolist()))  # sorted, no repeats
    assert sample_anchors(mask, 10, torch.Generator().manual_seed(0)).tolist() == [2, 3, 6]
    draws = {tuple(sample_anchors(mask, 2, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(draws) == 3  # every pair is drawn
    same = [sample_anchors(mask, 2, torch.Generator().manual_seed(7)).tolist() for _ in range(2)]
    assert same[0] == same[1]


def test_sequence_without_candidates_gets_an_unsupervised_dummy_anchor():
    from deepspec.models.losses import IGNORE, block_labels

    ids, mask = torch.arange(5), torch.tensor([0, 1, 0, 1, 0])
    anchors = sample_anchors(mask, 4, torch.Generator().manual_seed(0))
    assert anchors.tolist() == [4]
    assert (block_labels(ids, mask, anchors, 3) == IGNORE).all()


@pytest.mark.parametrize("target_config", [LLAMA, QWEN3], ids=["llama", "qwen3"])
def test_training_path_matches_inference_path(target_config):
    draft = tiny_draft(target_config).eval()
    seqs = random_sequences(2, 32)
    anchors = [torch.tensor([1, 5, 11]), torch.tensor([3, 8])]
    logits = draft.lm_head(draft(pack_blocks(seqs, anchors, 4, 3)))
    row = 0
    for (ids, feats), anchor_positions in zip(seqs, anchors, strict=True):
        for p in anchor_positions.tolist():
            expected = draft.draft_logits(feats[:p], int(ids[p]))  # mask slots 1..3 of the block
            torch.testing.assert_close(logits[row + 1 : row + 4], expected, atol=1e-5, rtol=1e-5)
            row += 4


def test_mask_slot_k_learns_the_token_at_its_own_position():
    """The engines' DFlash convention: the loss of the block anchored at p asks mask slot k for x_{p+k},
    and `draft_logits` row k-1 is that slot. Shifting the labels by one slot (upstream's DSpark
    convention) changes the loss, so this pins what vLLM serves."""
    from deepspec.models.drafts.dflash import DFlashSettings, training_loss

    draft = tiny_draft(QWEN3).eval()
    ids, feats = random_sequences(2, 32, lengths=(9,))[0]
    settings = DFlashSettings(
        name="dflash", block_size=4, num_layers=2, loss_decay=2.0, anchors_per_sequence=99
    )
    sample = {"input_ids": ids, "loss_mask": torch.ones(9, dtype=torch.long), "features": feats}
    loss, _ = training_loss(draft, draft, [sample], settings, None, torch.Generator().manual_seed(0))

    def expected_loss(shift: int) -> torch.Tensor:
        total, weight = torch.zeros(()), torch.zeros(())
        for p in range(8):  # every anchor: each supervised token with a supervised next token
            rows = draft.draft_logits(feats[:p], int(ids[p]))
            for k in range(1, 4):
                if p + k + shift < 9:
                    w = math.exp(-(k - 1) / 2.0)
                    total += w * torch.nn.functional.cross_entropy(rows[k - 1], ids[p + k + shift])
                    weight += w
        return total / weight

    torch.testing.assert_close(loss, expected_loss(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(loss, expected_loss(1), atol=1e-3)


def test_every_target_gets_the_engines_layer_with_qk_norm():
    draft = tiny_draft(QWEN3)
    assert draft.cfg.qk_norm and draft.cfg.head_dim == 16
    assert draft.layers[0].self_attn.q_proj.weight.shape == (4 * 16, 32)
    assert tiny_draft(LLAMA).cfg.qk_norm  # vLLM's DFlash layer normalises q and k for every target
    assert draft.num_draft_tokens == 3  # a block of 4 slots: the anchor and 3 drafting mask slots


def test_only_draft_weights_get_gradients():
    draft = tiny_draft(LLAMA)
    seqs = random_sequences(2, 32)
    hidden = draft(pack_blocks(seqs, [torch.tensor([2, 7]), torch.tensor([4])], 4, 3))
    draft.lm_head(hidden).logsumexp(-1).sum().backward()
    assert draft.embed_tokens.weight.grad is None and draft.lm_head.weight.grad is None
    trainable = {n for n, p in draft.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith(("embed_tokens", "lm_head")) for n in trainable)
    assert all(p.grad is not None for n, p in draft.named_parameters() if n in trainable)


def test_context_after_the_anchor_does_not_change_its_block():
    draft = tiny_draft(LLAMA).eval()
    ids, feats = random_sequences(2, 32, lengths=(12,))[0]
    changed = feats.clone()
    changed[6:] += 5.0  # positions at and after anchor 6 must be invisible to its block
    a = draft.lm_head(draft(pack_blocks([(ids, feats)], [torch.tensor([6])], 4, 3)))
    b = draft.lm_head(draft(pack_blocks([(ids, changed)], [torch.tensor([6])], 4, 3)))
    torch.testing.assert_close(a, b)
    changed[5] += 5.0
    c = draft.lm_head(draft(pack_blocks([(ids, changed)], [torch.tensor([6])], 4, 3)))
    assert not torch.allclose(a, c)


def test_save_load_round_trip_excludes_target_weights(tmp_path):
    draft = tiny_draft(QWEN3).eval()
    save(draft, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "fc.weight" in keys and "layers.1.self_attn.k_norm.weight" in keys
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in keys)
    loaded = load(tmp_path, draft.embed_tokens.weight.clone(), draft.lm_head.weight.clone())
    feats = torch.randn(5, 64)
    torch.testing.assert_close(loaded.draft_logits(feats, 7), draft.draft_logits(feats, 7))


def test_load_rejects_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ConfigError, match="DFlashDraftModel"):
        load(tmp_path, torch.zeros(1, 1), torch.zeros(1, 1))


def test_gemma_embeddings_are_not_scaled_as_the_engines_dflash_embeds():
    from transformers import Gemma3TextConfig

    cfg = DFlashConfig.from_target(
        Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            num_hidden_layers=2,
            vocab_size=40,
        ),  # fmt: skip
        num_layers=1,
        block_size=2,
        layer_ids=[0],
        mask_token_id=0,  # fmt: skip
    )
    assert cfg.embed_scale == 1.0 and cfg.qk_norm
