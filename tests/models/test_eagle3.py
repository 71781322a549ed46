"""Eagle3 draft: TTT mask and attention, train/inference agreement, loss, vocabulary, save/load, export."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support import tiny
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, LlamaConfig

from deepspec.models.drafts.eagle3 import (
    Eagle3Config,
    Eagle3Draft,
    Eagle3Settings,
    build_draft_vocab,
    default_layer_ids,
    export,
    load,
    save,
    token_counts,
    ttt_attend,
    ttt_attention_mask,
    ttt_loss,
    validate_export,
)
from deepspec.models.errors import ConfigError

torch.set_num_threads(1)

LLAMA, QWEN3 = tiny.llama(), tiny.qwen3()
REDUCED = 20  # draft vocabulary of the reduced-vocabulary cases


def tiny_draft(target_config, steps=3, draft_vocab=None) -> Eagle3Draft:
    torch.manual_seed(0)
    cfg = Eagle3Config.from_target(
        target_config, layer_ids=[0, 1, 3], ttt_steps=steps, draft_vocab_size=draft_vocab
    )
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size)
    head = torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.3
    d2t = None
    if draft_vocab is not None:
        counts = torch.randint(0, 100, (cfg.vocab_size,), generator=torch.Generator().manual_seed(3))
        d2t, _ = build_draft_vocab(counts, draft_vocab)
    return Eagle3Draft(cfg, embed, head, d2t=d2t)


def random_batch(batch=2, length=11, hidden=32, vocab=50, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    feats = torch.randn(batch, length, 3 * hidden, generator=gen)
    return ids, feats


CASES = [(LLAMA, None), (QWEN3, None), (LLAMA, REDUCED)]
CASE_IDS = ["llama", "qwen3", "llama-reduced-vocab"]


def test_ttt_mask_matches_brute_force_definition():
    seq_len, step = 6, 3
    mask = ttt_attention_mask(seq_len, step)
    assert mask.shape == (seq_len, (step + 1) * seq_len)
    for i in range(seq_len):
        for s in range(step + 1):
            for j in range(seq_len):
                # step-0 keys: the causal prefix; later steps: only the query's own position (its chain)
                expected = j <= i if s == 0 else j == i
                assert mask[i, s * seq_len + j].item() == expected, (i, s, j)
    assert ttt_attention_mask(seq_len, 0).equal(torch.ones(seq_len, seq_len).tril().bool())


def test_ttt_attention_equals_dense_masked_attention():
    gen = torch.Generator().manual_seed(0)
    b, h, t, hd, steps = 2, 4, 7, 8, 3
    q = torch.randn(b, h, t, hd, generator=gen)
    keys = [torch.randn(b, h, t, hd, generator=gen) for _ in range(steps + 1)]
    values = [torch.randn(b, h, t, hd, generator=gen) for _ in range(steps + 1)]
    fast = ttt_attend(q, keys[0], values[0], keys[1:], values[1:], torch.arange(t))
    dense = F.scaled_dot_product_attention(
        q, torch.cat(keys, dim=2), torch.cat(values, dim=2), attn_mask=ttt_attention_mask(t, steps)
    )
    torch.testing.assert_close(fast, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("target_config", "draft_vocab"), CASES, ids=CASE_IDS)
def test_training_path_matches_inference_path(target_config, draft_vocab):
    draft = tiny_draft(target_config, steps=3, draft_vocab=draft_vocab).eval()
    ids, feats = random_batch()
    with torch.no_grad():
        train = draft.ttt_logits(feats, ids)  # [K, B, T, Vd]
    assert train.shape == (3, 2, 11, draft.cfg.draft_vocab_size)
    for b in range(2):
        for p in (1, 4, 8):  # context 0..p-1, anchor at p: chain index p - 1 of every TTT step
            forced = ids[b, p + 1 : p + 3].tolist()  # step k reads token p + k
            chain = draft.chain_logits(feats[b, :p], ids[b, :p], int(ids[b, p]), 3, tokens=forced)
            torch.testing.assert_close(chain, train[:, b, p - 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("target_config", "draft_vocab"), CASES, ids=CASE_IDS)
def test_draft_logits_are_a_greedy_chain_in_target_vocabulary(target_config, draft_vocab):
    draft = tiny_draft(target_config, steps=4, draft_vocab=draft_vocab).eval()
    ids, feats = random_batch(batch=1)
    p = 6
    out = draft.draft_logits(feats[0, :p], int(ids[0, p]), context_ids=ids[0, :p])
    assert out.shape == (draft.num_draft_tokens, 50)
    greedy = out.argmax(-1).tolist()
    # feeding the chain's own argmax tokens back reproduces it
    chain = draft.chain_logits(feats[0, :p], ids[0, :p], int(ids[0, p]), 4, tokens=greedy[:-1])
    torch.testing.assert_close(draft.to_target_vocab(chain), out)
    outside = ~draft.t2d
    assert bool(torch.isinf(out[:, outside]).all()) and bool(torch.isfinite(out[:, draft.t2d]).all())
    if draft_vocab is not None:
        assert all(draft.t2d[t] for t in greedy)


def test_context_after_a_position_does_not_change_its_chain():
    draft = tiny_draft(LLAMA).eval()
    ids, feats = random_batch(batch=1)
    changed_ids, changed_feats = ids.clone(), feats.clone()
    changed_feats[0, 6:] += 5.0  # index 5 of every step sees features 0..5 and tokens up to 5 + k + 1
    changed_ids[0, 9:] = (changed_ids[0, 9:] + 1) % 50
    with torch.no_grad():
        a, c = draft.ttt_logits(feats, ids), draft.ttt_logits(changed_feats, changed_ids)
    torch.testing.assert_close(a[:, 0, :6], c[:, 0, :6])
    assert not torch.allclose(a[:, 0, 6], c[:, 0, 6])


def test_right_padding_does_not_change_real_positions():
    draft = tiny_draft(QWEN3).eval()
    ids, feats = random_batch(batch=1, length=8)
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded_feats = torch.cat([feats, torch.randn(1, 4, feats.shape[-1])], dim=1)
    with torch.no_grad():
        short, long = draft.ttt_logits(feats, ids), draft.ttt_logits(padded_feats, padded_ids)
    for k in range(3):  # index i of step k reads token i + k + 1, which must lie inside the real sequence
        torch.testing.assert_close(long[k, :, : 8 - k - 1], short[k, :, : 8 - k - 1])


@pytest.mark.parametrize("draft_vocab", [None, REDUCED], ids=["full-vocab", "reduced-vocab"])
def test_only_trainable_parameters_get_gradients(draft_vocab):
    draft = tiny_draft(LLAMA, draft_vocab=draft_vocab)
    ids, feats = random_batch()
    loss, _ = draft.forward_train(feats, ids, torch.ones_like(ids))
    loss.backward()
    assert draft.embed_tokens.weight.grad is None
    trainable = {n for n, p in draft.named_parameters() if p.requires_grad}
    expected_head = draft_vocab is not None  # the target's head is frozen; a reduced head is the draft's
    assert ("lm_head.weight" in trainable) == expected_head
    assert (draft.lm_head.weight.grad is not None) == expected_head
    assert "fc.weight" in trainable and "midlayer.hidden_norm.weight" in trainable
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in draft.named_parameters() if n in trainable
    )


def test_loss_matches_hand_computed_value():
    step0 = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # two supervised rows
    teacher0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    step1 = torch.tensor([[math.log(3.0), 0.0]])  # q = (3/4, 1/4)
    teacher1 = torch.tensor([[0.5, 0.5]])
    loss, stats = ttt_loss([step0, step1], [teacher0, teacher1], step_decay=0.8)
    ce0 = math.log(2.0) + (math.log(1 + math.exp(2.0)))  # -log(1/2), -log(1 / (1 + e^2))
    ce1 = -0.5 * math.log(0.75) - 0.5 * math.log(0.25)
    assert loss.item() == pytest.approx((1.0 * ce0 + 0.8 * ce1) / (1.0 * 2 + 0.8 * 1), rel=1e-6)
    assert stats["slot_counts"].tolist() == [2.0, 1.0]
    assert stats["slot_hits"].tolist() == [1.0, 1.0]  # step 0: row 0 hits, row 1 misses; step 1 hits


def brute_force_loss(draft, feats, ids, loss_mask, target_logits, decay):
    """The TTT loss from its definition, row by row, on the training path's full logits."""
    logits = draft.ttt_logits(feats, ids)
    draft_ids = draft.draft_to_target
    total, weight = 0.0, 0.0
    counts = [0] * draft.cfg.ttt_steps
    for k in range(draft.cfg.ttt_steps):
        for b in range(ids.shape[0]):
            for i in range(ids.shape[1]):
                t = i + k + 2  # index i of step k predicts token t
                if t >= ids.shape[1] or not loss_mask[b, t]:
                    continue
                if target_logits is None:
                    if not draft.t2d[ids[b, t]]:
                        continue
                    teacher = (draft_ids == ids[b, t]).float()
                else:
                    row = target_logits[b, t - 1]
                    if not draft.t2d[row.argmax()]:
                        continue
                    teacher = torch.softmax(row[draft_ids], -1)
                ce = -(teacher * torch.log_softmax(logits[k, b, i], -1)).sum()
                total += decay**k * float(ce)
                weight += decay**k
                counts[k] += 1
    return total / weight, counts


def teacher_inputs(kind: str, draft=None, ids=None, feats=None):
    """forward_train's teacher arguments of each kind, and the [B, T, V] logits they stand for."""
    gen = torch.Generator().manual_seed(5)
    head, final = torch.randn(50, 32, generator=gen), torch.randn(2, 9, 32, generator=gen)
    if kind == "hidden":  # the target's final states through its head, Gemma-capped
        logits = 2.0 * torch.tanh(final @ head.t() / 2.0)
        return {"target_hidden": final, "target_head": head, "target_softcap": 2.0}, logits
    if kind == "logits":
        logits = final @ head.t() * 3
        return {"target_logits": logits}, logits
    if kind == "own-step-0":  # the draft's own step 0 as the target: every kept step-0 row agrees
        with torch.no_grad():
            own = draft.to_target_vocab(draft.ttt_logits(feats, ids)[0]).clamp(min=-1e4)
        logits = torch.cat([own[:, :1], own[:, :-1]], dim=1)  # token t's law at row t - 1 = index t - 2
        return {"target_logits": logits}, logits
    return {}, None  # hard labels


TEACHERS = ["hidden", "logits", "hard"]


@pytest.mark.parametrize("chunk_rows", [None, 4], ids=["reference", "chunked"])
@pytest.mark.parametrize("kind", TEACHERS)
@pytest.mark.parametrize("draft_vocab", [None, REDUCED], ids=["full-vocab", "reduced-vocab"])
def test_forward_train_matches_brute_force_loss(kind, draft_vocab, chunk_rows):
    draft = tiny_draft(LLAMA, steps=3, draft_vocab=draft_vocab)
    ids, feats = random_batch(length=9)
    loss_mask = torch.ones_like(ids)
    loss_mask[0, :3] = 0  # a prompt
    loss_mask[1, 7:] = 0  # right padding
    teacher, target_logits = teacher_inputs(kind)
    with torch.no_grad():
        loss, stats = draft.forward_train(
            feats, ids, loss_mask, step_decay=0.7, chunk_rows=chunk_rows, **teacher
        )
        expected, counts = brute_force_loss(draft, feats, ids, loss_mask, target_logits, 0.7)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["slot_counts"].tolist() == counts
    assert all(0 <= h <= c for h, c in zip(stats["slot_hits"].tolist(), counts, strict=True))


@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])  # 5: a token's rows of its 3 steps span two chunks
@pytest.mark.parametrize("kind", [*TEACHERS, "own-step-0"])
@pytest.mark.parametrize("draft_vocab", [None, REDUCED], ids=["full-vocab", "reduced-vocab"])
def test_chunked_loss_equals_reference_in_loss_gradients_and_stats(kind, draft_vocab, chunk_rows):
    """The chunked path (teacher from hidden states, gradients formed chunk by chunk) against the
    reference, which forms every supervised row's logits at once and leaves the backward to autograd."""
    draft = tiny_draft(LLAMA, steps=3, draft_vocab=draft_vocab)
    ids, feats = random_batch(length=9)
    loss_mask = torch.ones_like(ids)
    loss_mask[0, :3] = 0
    loss_mask[1, 7:] = 0
    teacher, _ = teacher_inputs(kind, draft, ids, feats)
    results = []
    for rows in (None, chunk_rows):
        draft.zero_grad()
        loss, stats = draft.forward_train(feats, ids, loss_mask, step_decay=0.7, chunk_rows=rows, **teacher)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}
        results.append((loss, stats, grads))
    (ref_loss, ref_stats, ref_grads), (loss, stats, grads) = results
    torch.testing.assert_close(loss, ref_loss)
    assert torch.equal(stats["slot_counts"], ref_stats["slot_counts"])
    assert torch.equal(stats["slot_hits"], ref_stats["slot_hits"])
    assert grads.keys() == ref_grads.keys() and "fc.weight" in grads
    assert ("lm_head.weight" in grads) == (draft_vocab is not None)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6)
    if kind == "own-step-0":
        assert stats["slot_hits"][0] == stats["slot_counts"][0] > 0


class VocabularyWideTensors(TorchDispatchMode):
    """Records the shape of every tensor an op creates whose last dimension is a vocabulary size."""

    def __init__(self, vocab_sizes):
        super().__init__()
        self.vocab_sizes, self.shapes = set(vocab_sizes), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] in self.vocab_sizes:
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("draft_vocab", [None, REDUCED], ids=["full-vocab", "reduced-vocab"])
def test_chunked_training_forms_vocabulary_wide_tensors_a_chunk_of_rows_at_a_time(draft_vocab):
    """No [B, T, V] teacher nor [K, B, T, Vd] draft logits: every vocabulary-wide tensor of the forward
    and backward has at most `chunk_rows` rows (the head's transpose, [d, V], aside)."""
    draft = tiny_draft(LLAMA, steps=3, draft_vocab=draft_vocab)
    ids, feats = random_batch(length=9)
    teacher, _ = teacher_inputs("hidden")
    spy = VocabularyWideTensors({50, draft.cfg.draft_vocab_size})
    with spy:
        loss, stats = draft.forward_train(feats, ids, torch.ones_like(ids), chunk_rows=4, **teacher)
        loss.backward()
    assert stats["slot_counts"].sum() > 4  # more than one chunk's rows
    rows = [math.prod(shape[:-1]) for shape in spy.shapes if shape != (32, shape[-1])]
    assert rows and max(rows) <= 4, spy.shapes
    with spy:  # the reference holds every supervised row's logits: the check sees them
        draft.forward_train(feats, ids, torch.ones_like(ids), chunk_rows=None, **teacher)
    assert max(math.prod(shape[:-1]) for shape in spy.shapes) > 4


def test_teacher_inputs_are_checked():
    draft = tiny_draft(LLAMA, draft_vocab=REDUCED)
    ids, feats = random_batch(length=9)
    teacher, logits = teacher_inputs("hidden")
    with pytest.raises(ValueError, match="at most one"):
        draft.forward_train(feats, ids, torch.ones_like(ids), logits, **teacher)
    with pytest.raises(ValueError, match="needs target_head"):  # a reduced head is not the target's
        draft.forward_train(feats, ids, torch.ones_like(ids), target_hidden=teacher["target_hidden"])
    full = tiny_draft(LLAMA)  # the full-vocabulary head is the target's: it is the default
    with torch.no_grad():
        a, _ = full.forward_train(feats, ids, torch.ones_like(ids), target_hidden=teacher["target_hidden"])
        b, _ = full.forward_train(feats, ids, torch.ones_like(ids), full.lm_head(teacher["target_hidden"]))
    torch.testing.assert_close(a, b)


def test_unbatched_input_equals_batch_of_one():
    draft = tiny_draft(QWEN3)
    ids, feats = random_batch(batch=1)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a, _ = draft.forward_train(feats, ids, mask)
        b, _ = draft.forward_train(feats[0], ids[0], mask[0])
    torch.testing.assert_close(a, b)


def test_build_draft_vocab_keeps_most_frequent_tokens():
    counts = torch.tensor([5, 0, 9, 9, 1, 7, 0, 3])
    d2t, t2d = build_draft_vocab(counts, 4)
    assert (torch.arange(4) + d2t).tolist() == [0, 2, 3, 5]  # 9, 9, 7, 5; draft ids in target order
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool
    assert t2d.tolist() == [True, False, True, True, False, True, False, False]
    _, tie = build_draft_vocab(torch.tensor([1, 2, 2, 2]), 2)
    assert tie.tolist() == [False, True, True, False]  # equal counts: lower id first
    with pytest.raises(ConfigError, match="draft_vocab_size"):
        build_draft_vocab(counts, 9)


def test_token_counts_count_only_supervised_tokens():
    seqs = [
        (torch.tensor([1, 2, 2, 3]), torch.tensor([0, 1, 1, 1])),
        (torch.tensor([3, 3]), torch.tensor([1, 0])),
    ]
    assert token_counts(seqs, 5).tolist() == [0, 0, 2, 2, 0]


def test_reduced_head_starts_from_target_rows_and_needs_d2t():
    draft = tiny_draft(LLAMA, draft_vocab=REDUCED)
    cfg = draft.cfg
    with pytest.raises(ConfigError, match="d2t"):
        Eagle3Draft(cfg, draft.embed_tokens.weight, torch.zeros(cfg.vocab_size, cfg.hidden_size))
    head = torch.randn(cfg.vocab_size, cfg.hidden_size)
    fresh = Eagle3Draft(cfg, draft.embed_tokens.weight, head, d2t=draft.d2t)
    torch.testing.assert_close(fresh.lm_head.weight, head[fresh.draft_to_target])


def test_config_checks_layer_ids_and_vocab():
    with pytest.raises(ConfigError, match="exactly 3"):
        Eagle3Config.from_target(LLAMA, layer_ids=[0, 1], ttt_steps=7)
    with pytest.raises(ConfigError, match="layer_ids"):
        Eagle3Config.from_target(LLAMA, layer_ids=[0, 1, 4], ttt_steps=7)
    with pytest.raises(ConfigError, match="draft_vocab_size"):
        Eagle3Config.from_target(LLAMA, layer_ids=[0, 1, 3], ttt_steps=7, draft_vocab_size=51)
    assert default_layer_ids(36) == [1, 17, 32]  # vLLM/SGLang default (2, 18, 33) minus one
    assert default_layer_ids(4) == [1, 1, 0]


def test_settings_problems_name_the_keys():
    """The algo section's checks, which compose runs: Eagle3's own names, the three layers it fuses."""
    good = Eagle3Settings(name="eagle3", ttt_steps=7, step_decay=0.8, draft_vocab_size=None)
    assert good.problems([1, 17, 32], 36) == []
    bad = Eagle3Settings(name="eagle3", ttt_steps=0, step_decay=1.5, draft_vocab_size=0)
    problems = "\n".join(bad.problems([1, 9, 17, 25, 33], 36))
    for key in ("algo.ttt_steps=0", "algo.step_decay=1.5", "algo.draft_vocab_size=0"):
        assert key in problems
    assert "exactly 3 target layers" in problems and "'target.layer_ids=[1,17,32]'" in problems


@pytest.mark.parametrize("draft_vocab", [None, REDUCED], ids=["full-vocab", "reduced-vocab"])
def test_save_load_round_trip(tmp_path, draft_vocab):
    draft = tiny_draft(QWEN3, draft_vocab=draft_vocab).eval()
    save(draft, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"fc.weight", "midlayer.self_attn.q_proj.weight", "norm.weight", "d2t", "t2d"} <= keys
    assert not any(k.startswith("embed_tokens") for k in keys)
    assert ("lm_head.weight" in keys) == (draft_vocab is not None)  # saved only when it is trained
    target_head = torch.randn(50, 32) if draft_vocab is not None else draft.lm_head.weight.clone()
    loaded = load(tmp_path, draft.embed_tokens.weight.clone(), target_head)
    ids, feats = random_batch(batch=1)
    torch.testing.assert_close(
        loaded.draft_logits(feats[0, :5], 7, context_ids=ids[0, :5]),
        draft.draft_logits(feats[0, :5], 7, context_ids=ids[0, :5]),
    )
    assert loaded.cfg == draft.cfg and loaded.d2t.equal(draft.d2t)


def test_load_rejects_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ConfigError, match="LlamaForCausalLMEagle3"):
        load(tmp_path, torch.zeros(1, 1), torch.zeros(1, 1))


@pytest.mark.parametrize("draft_vocab", [None, REDUCED], ids=["full-vocab", "reduced-vocab"])
def test_export_has_engine_names_config_and_validates(tmp_path, draft_vocab):
    draft = tiny_draft(QWEN3, draft_vocab=draft_vocab)
    export(draft, tmp_path, QWEN3)
    assert validate_export(tmp_path) == []
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 4]  # vLLM: input of layer j = our j - 1
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 3]  # SGLang adds 1 itself
    assert config["draft_vocab_size"] == (draft_vocab or 50) and config["vocab_size"] == 50
    assert config["head_dim"] == 16 and config["num_hidden_layers"] == 1
    assert config["target_hidden_size"] == 32 and config["tie_word_embeddings"] is False
    hf = AutoConfig.from_pretrained(tmp_path)  # what both engines parse it with
    assert hf.draft_vocab_size == config["draft_vocab_size"] and hf.head_dim == 16
    state = load_file(str(tmp_path / "model.safetensors"))
    assert set(state) == {
        "fc.weight", "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
        "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
        "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight",
        "midlayer.post_attention_layernorm.weight", "midlayer.mlp.gate_proj.weight",
        "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight", "norm.weight", "lm_head.weight",
    } | ({"d2t", "t2d"} if draft_vocab else set())  # fmt: skip
    # vLLM creates draft_id_to_target_id only for a reduced vocabulary and refuses a d2t without it
    assert state["fc.weight"].shape == (32, 96) and state["midlayer.self_attn.q_proj.weight"].shape == (
        64,
        64,
    )
    if draft_vocab:
        assert state["d2t"].dtype == torch.int64 and state["t2d"].dtype == torch.bool
    torch.testing.assert_close(state["lm_head.weight"], draft.lm_head.weight.detach())
    # the export also loads back as a DeepSpec draft
    loaded = load(
        tmp_path, draft.embed_tokens.weight, torch.randn(50, 32) if draft_vocab else state["lm_head.weight"]
    )
    ids, feats = random_batch(batch=1)
    torch.testing.assert_close(
        loaded.chain_logits(feats[0, :4], ids[0, :4], 3, 3),
        draft.chain_logits(feats[0, :4], ids[0, :4], 3, 3),
    )


def test_validate_reports_missing_and_inconsistent_parts(tmp_path):
    draft = tiny_draft(LLAMA, draft_vocab=REDUCED)
    export(draft, tmp_path, LLAMA)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["midlayer.hidden_norm.weight"]
    state["d2t"] = torch.zeros_like(state["d2t"])  # no longer matches t2d
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = config["eagle_aux_hidden_state_layer_ids"]
    del config["draft_vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert validate_export(tmp_path) == ["config.json: missing field 'draft_vocab_size'"]
    config["draft_vocab_size"] = REDUCED
    (tmp_path / "config.json").write_text(json.dumps(config))
    problems = "\n".join(validate_export(tmp_path))
    assert "midlayer.hidden_norm.weight" in problems and "extra.weight" in problems
    assert "minus one" in problems and "d2t" in problems
    (tmp_path / "model.safetensors").unlink()
    assert validate_export(tmp_path) == [f"{tmp_path}: missing model.safetensors"]
    assert validate_export(tmp_path / "nowhere") == [
        f"{tmp_path / 'nowhere'}: missing config.json and model.safetensors"
    ]


def test_export_rejects_another_target(tmp_path):
    with pytest.raises(ConfigError, match="built for"):
        export(tiny_draft(LLAMA), tmp_path, LlamaConfig(hidden_size=64, vocab_size=50))


# ---------------------------------------------------------------------------------------------------------
# The real tiny target (stories260k: Llama, 5 layers, width 64, vocab 512)


@pytest.fixture(scope="module")
def stories(assets_dir):
    from deepspec.models.target import capture_features, load_embedding_and_head, load_target

    path = str(assets_dir / "models" / "stories260k")
    model, tokenizer = load_target(path)
    embed, head = load_embedding_and_head(path)
    ids = torch.tensor(
        tokenizer("Once upon a time, there was a little girl named Lily. She liked to")["input_ids"]
    )
    layer_ids = [0, 2, 4]
    with torch.no_grad():
        feats = capture_features(model, ids[None], layer_ids)[0]
        logits = model(ids[None]).logits[0].float()
    return model, embed, head, ids, feats, logits, layer_ids


@pytest.mark.parametrize("draft_vocab", [None, 128], ids=["full-vocab", "reduced-vocab"])
def test_stories260k_trains_and_agrees_with_inference(stories, draft_vocab, tmp_path):
    model, embed, head, ids, feats, logits, layer_ids = stories
    cfg = Eagle3Config.from_target(
        model.config, layer_ids=layer_ids, ttt_steps=3, draft_vocab_size=draft_vocab
    )
    assert (cfg.vocab_size, cfg.hidden_size, cfg.head_dim) == (512, 64, 8)
    d2t = None
    if draft_vocab is not None:  # the sequence's own tokens first, then the rest by id
        d2t, _ = build_draft_vocab(token_counts([(ids, torch.ones_like(ids))], 512), draft_vocab)
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg, embed, head, d2t=d2t)
    mask = torch.ones_like(ids)
    mask[:3] = 0
    with torch.no_grad():  # the teacher as the trainer hands it over: final states and the head
        final = model.model(ids[None]).last_hidden_state[0]
    torch.testing.assert_close(final @ head.t(), logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        from_logits, _ = draft.forward_train(feats, ids, mask, logits)
        from_hidden, _ = draft.forward_train(feats, ids, mask, target_hidden=final, target_head=head)
    torch.testing.assert_close(from_hidden, from_logits, atol=1e-5, rtol=1e-5)
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        loss, stats = draft.forward_train(feats, ids, mask, target_hidden=final, target_head=head)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.8 * losses[0], losses
    supervised = ids.shape[0] - 3  # step 0 predicts tokens 2.., the first three are masked
    assert (
        stats["slot_counts"][0] == supervised
        if draft_vocab is None
        else 0 < stats["slot_counts"][0] <= supervised
    )

    draft.eval()
    p = 8
    with torch.no_grad():
        train = draft.ttt_logits(feats[None], ids[None])[:, 0, p - 1]
    chain = draft.chain_logits(feats[:p], ids[:p], int(ids[p]), 3, tokens=ids[p + 1 : p + 3].tolist())
    torch.testing.assert_close(chain, train, atol=1e-4, rtol=1e-4)
    out = draft.draft_logits(feats[:p], int(ids[p]), context_ids=ids[:p])
    assert out.shape == (3, 512) and bool(draft.t2d[out.argmax(-1)].all())

    export(draft, tmp_path, model.config)
    assert validate_export(tmp_path) == []
