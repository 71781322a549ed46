"""DSpark draft: the teacher-forced training path equals left-to-right inference, only draft weights train,
the loss by hand, save/load and upstream's export layout; tiny random Qwen3/Llama configs and the real
stories260k model."""

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from support import tiny
from transformers import Qwen3Config

from deepspec.models.drafts.dflash import pack_blocks
from deepspec.models.drafts.dspark import (
    DSparkConfig,
    DSparkDraft,
    DSparkSettings,
    block_rows,
    export,
    load,
    save,
    validate_export,
)
from deepspec.models.errors import ConfigError
from deepspec.models.losses import (
    IGNORE,
    acceptance_label,
    block_labels,
    chunked_dspark_loss,
    dspark_loss,
    slot_weights,
    supervised_prefix,
    total_variation,
)

torch.set_num_threads(1)

LLAMA, QWEN3, GEMMA = tiny.llama(layers=3), tiny.qwen3(layers=3), tiny.gemma3()
CAPPED = tiny.qwen3(layers=3, final_logit_softcapping=2.0)  # a target that caps its logits, as Gemma does
HEADS = ("vanilla", "gated", "rnn")
BLOCK = 4
LOSS_WEIGHTS = {"ce_weight": 0.1, "l1_weight": 0.9, "confidence_weight": 1.0}  # upstream's recipe


def tiny_dspark(target_config, head="vanilla", *, rank=8, confidence=True, with_markov=True) -> DSparkDraft:
    torch.manual_seed(0)
    cfg = DSparkConfig.from_target(
        target_config,
        num_layers=2,
        block_size=BLOCK,
        layer_ids=[0, 1],
        mask_token_id=3,
        markov_rank=rank,
        markov_head_type=head,
        confidence_head=confidence,
        confidence_head_with_markov=with_markov and rank > 0,
        num_anchors=8,
    )
    embed = torch.randn(cfg.backbone.vocab_size, cfg.backbone.hidden_size)
    head_weight = torch.randn(cfg.backbone.vocab_size, cfg.backbone.hidden_size) * 0.1
    model = DSparkDraft(cfg, embed, head_weight)
    with torch.no_grad():  # the heads start near zero (std 0.02): make their effect visible
        for module in (model.markov_head, model.confidence_head):
            for p in module.parameters() if module is not None else ():
                p.normal_(std=0.5)
    return model


def random_sequences(lengths=(12, 9)):
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, 50, (t,), generator=gen), torch.randn(t, 2 * 32, generator=gen)) for t in lengths
    ]


ANCHORS = [torch.tensor([1, 5]), torch.tensor([3])]  # blocks end before each sequence does


def teacher_forced(model, seqs, anchors=ANCHORS):
    packed = pack_blocks(seqs, anchors, BLOCK, 3)
    prev = torch.cat([block_rows(ids, a, BLOCK) for (ids, _), a in zip(seqs, anchors, strict=True)])
    return model.block_states(packed, prev)


def test_block_rows_are_the_tokens_before_each_slot():
    ids = torch.tensor([10, 11, 12, 13, 14, 15])
    assert block_rows(ids, torch.tensor([1, 4]), 3).tolist() == [[11, 12, 13], [14, 15, 15]]
    hidden = torch.arange(12.0).view(6, 2)
    assert block_rows(hidden, torch.tensor([0]), 2).tolist() == [[[0.0, 1.0], [2.0, 3.0]]]


def test_shapes():
    model = tiny_dspark(QWEN3, "rnn").eval()
    seqs = random_sequences()
    states = teacher_forced(model, seqs)
    assert states.hidden.shape == (3, BLOCK, 32)
    assert states.codes.shape == (3, BLOCK, 8)
    assert states.confidence_logits.shape == (3, BLOCK)
    assert model.slot_logits(states).shape == (3 * BLOCK, 50)
    assert model.draft_logits(seqs[0][1][:5], 7).shape == (BLOCK, 50)
    proposal = model.propose(seqs[0][1][:5], 7)
    assert len(proposal.tokens) == BLOCK and proposal.probs.shape == (BLOCK, 50)
    assert proposal.confidence.shape == (BLOCK,)
    assert model.confidence_head.proj.weight.shape == (1, 32 + 8)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("target_config", [LLAMA, QWEN3], ids=["llama", "qwen3"])
def test_teacher_forced_chain_equals_greedy_chain(target_config, head):
    """Writing the greedy chain into the sequence after the anchor and running the training path must
    give the logits and confidences inference computed slot by slot."""
    model = tiny_dspark(target_config, head).eval()
    seqs = random_sequences()
    expected, forced = [], []
    for (ids, feats), anchors in zip(seqs, ANCHORS, strict=True):
        ids = ids.clone()
        for p in anchors.tolist():
            proposal = model.propose(feats[:p], int(ids[p]))
            assert proposal.tokens == proposal.logits.argmax(-1).tolist()
            torch.testing.assert_close(proposal.logits, model.draft_logits(feats[:p], int(ids[p])))
            ids[p + 1 : p + BLOCK] = torch.tensor(proposal.tokens[:-1])  # x_{k-1} of slots 1..B-1
            expected.append(proposal)
        forced.append((ids, feats))
    states = teacher_forced(model, forced)
    logits = model.slot_logits(states).view(-1, BLOCK, 50)
    for i, proposal in enumerate(expected):
        torch.testing.assert_close(logits[i], proposal.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.sigmoid(states.confidence_logits[i]), proposal.confidence)


def test_sampled_chain_conditions_each_slot_on_the_sampled_token():
    model = tiny_dspark(QWEN3, "rnn").eval()
    ids, feats = random_sequences(lengths=(12,))[0]
    p = 4
    proposal = model.propose(
        feats[:p], int(ids[p]), temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    again = model.propose(feats[:p], int(ids[p]), temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert proposal.tokens == again.tokens
    torch.testing.assert_close(proposal.probs, torch.softmax(proposal.logits, -1))
    forced = ids.clone()
    forced[p + 1 : p + BLOCK] = torch.tensor(proposal.tokens[:-1])
    states = teacher_forced(model, [(forced, feats)], [torch.tensor([p])])
    torch.testing.assert_close(model.slot_logits(states), proposal.logits, atol=1e-5, rtol=1e-5)
    greedy = model.propose(feats[:p], int(ids[p]))
    assert torch.equal(greedy.probs, torch.nn.functional.one_hot(torch.tensor(greedy.tokens), 50).float())


@pytest.mark.parametrize("head, changed_slots", [("vanilla", [1]), ("gated", [1]), ("rnn", [1, 2, 3])])
def test_markov_head_reads_the_previous_token(head, changed_slots):
    model = tiny_dspark(LLAMA, head).eval()
    ids, feats = random_sequences(lengths=(12,))[0]
    a = model.slot_logits(teacher_forced(model, [(ids, feats)], [torch.tensor([4])]))
    ids = ids.clone()
    ids[5] = (ids[5] + 1) % 50  # x_0, the previous token of slot 1
    b = model.slot_logits(teacher_forced(model, [(ids, feats)], [torch.tensor([4])]))
    changed = [k for k in range(BLOCK) if not torch.allclose(a[k], b[k])]
    assert changed == changed_slots


def test_without_markov_head_the_logits_are_dflash_logits():
    model = tiny_dspark(QWEN3, rank=0, confidence=False).eval()
    assert model.markov_head is None and model.confidence_head is None
    _, feats = random_sequences(lengths=(12,))[0]
    # every slot, the anchor's included (upstream's convention): the backbone's hidden states through the head
    backbone_logits = model.backbone.lm_head(model._block_hidden(feats[:6], 9)).float()
    torch.testing.assert_close(model.draft_logits(feats[:6], 9), backbone_logits)
    assert model.propose(feats[:6], 9).confidence is None


def training_batch(model, seqs, anchors=ANCHORS, loss_masks=None):
    gen = torch.Generator().manual_seed(2)
    finals = [torch.randn(ids.shape[0], 32, generator=gen) for ids, _ in seqs]
    loss_masks = loss_masks or [torch.ones_like(ids) for ids, _ in seqs]
    labels = torch.cat(
        [block_labels(ids, m, a, BLOCK) for (ids, _), m, a in zip(seqs, loss_masks, anchors, strict=True)]
    )
    prev = torch.cat([block_rows(ids, a, BLOCK) for (ids, _), a in zip(seqs, anchors, strict=True)])
    target_hidden = torch.cat([block_rows(f, a, BLOCK) for f, a in zip(finals, anchors, strict=True)])
    packed = pack_blocks(seqs, anchors, BLOCK, 3)
    return packed, prev, labels, target_hidden


@pytest.mark.parametrize("head", HEADS)
def test_only_draft_weights_get_gradients(head):
    model = tiny_dspark(LLAMA, head)
    packed, prev, labels, target_hidden = training_batch(model, random_sequences())
    batch = model(packed, prev, labels, target_hidden=target_hidden)
    loss, _ = dspark_loss(
        batch.draft_logits, batch.target_logits, batch.labels, batch.slots, batch.confidence_logits,
        slot_weights(BLOCK, 4.0), **LOSS_WEIGHTS,
    )  # fmt: skip
    loss.backward()
    frozen = [model.backbone.embed_tokens.weight, model.backbone.lm_head.weight]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".embed_tokens." in n or ".lm_head." in n for n in trainable)
    assert {"markov_head.markov_w1.weight", "confidence_head.proj.bias"} <= set(trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values()), [
        n for n, p in trainable.items() if p.grad is None
    ]


def test_forward_keeps_the_supervised_prefix_and_takes_either_teacher():
    model = tiny_dspark(QWEN3).eval()
    seqs = random_sequences()
    masks = [torch.ones(12, dtype=torch.long), torch.ones(9, dtype=torch.long)]
    masks[0][3] = 0  # token 3: slot 1 of anchor 1, so slots 2 and 3 of that block go too
    packed, prev, labels, target_hidden = training_batch(model, seqs, loss_masks=masks)
    batch = model(packed, prev, labels, target_hidden=target_hidden)
    assert batch.slots.tolist() == [0, 0, 1, 2, 3, 0, 1, 2, 3]
    assert batch.labels.tolist() == [
        int(seqs[0][0][2]),
        *seqs[0][0][6:10].tolist(),
        *seqs[1][0][4:8].tolist(),
    ]
    teacher_logits = model.backbone.lm_head(target_hidden)
    same = model(packed, prev, labels, target_logits=teacher_logits)
    torch.testing.assert_close(same.target_logits, batch.target_logits)
    assert not batch.target_logits.requires_grad
    with pytest.raises(ValueError, match="exactly one"):
        model(packed, prev, labels)


def test_supervised_prefix():
    labels = torch.tensor([[5, IGNORE, 6], [IGNORE, 1, 2], [1, 2, 3]])
    assert supervised_prefix(labels).tolist() == [[True, False, False], [False, False, False], [True] * 3]


def test_total_variation_and_the_soft_label():
    p, q = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.25, 0.25, 0.5])
    assert total_variation(p, q).item() == pytest.approx(0.5)
    assert total_variation(p, p).item() == 0.0
    assert total_variation(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == 1.0
    # acceptance of a token drawn from q: sum min(p, q) = 0.25 + 0.25 + 0.25 = 0.75 = 1 - TV
    draft, target = torch.tensor([[0.5, 0.25, 0.25]]).log(), torch.tensor([[0.25, 0.25, 0.5]]).log()
    assert acceptance_label(draft, target).item() == pytest.approx(0.75)
    # the BCE term's target is that label: BCE(c, 0.75) with c = sigmoid(0.3)
    loss, _ = dspark_loss(
        draft, target, torch.tensor([0]), torch.tensor([0]), torch.tensor([0.3]), torch.ones(1),
        ce_weight=0.0, l1_weight=0.0, confidence_weight=1.0,
    )  # fmt: skip
    c = 1 / (1 + math.exp(-0.3))
    assert loss.item() == pytest.approx(-(0.75 * math.log(c) + 0.25 * math.log(1 - c)), rel=1e-5)


def softmax(row):
    e = [math.exp(x) for x in row]
    return [x / sum(e) for x in e]


def test_loss_by_hand():
    draft = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    target = [[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]
    labels, slots, conf = [0, 1, 2], [0, 1, 0], [0.5, -1.0, 2.0]
    slot_w = [1.0, 0.5]
    total, weight_sum = 0.0, 0.0
    for d, t, y, k, c in zip(draft, target, labels, slots, conf, strict=True):
        pd, pt = softmax(d), softmax(t)
        ce = -math.log(pd[y])
        l1 = sum(abs(a - b) for a, b in zip(pd, pt, strict=True))
        soft = 1 - l1 / 2  # 1 - TV
        s = 1 / (1 + math.exp(-c))
        bce = -(soft * math.log(s) + (1 - soft) * math.log(1 - s))
        total += slot_w[k] * (0.1 * ce + 0.9 * l1 + 1.0 * bce)
        weight_sum += slot_w[k]
    loss, stats = dspark_loss(
        torch.tensor(draft), torch.tensor(target), torch.tensor(labels), torch.tensor(slots),
        torch.tensor(conf), torch.tensor(slot_w), **LOSS_WEIGHTS,
    )  # fmt: skip
    assert loss.item() == pytest.approx(total / weight_sum, rel=1e-6)
    assert stats["slot_counts"].tolist() == [2.0, 1.0]
    assert stats["slot_hits"].tolist() == [1.0, 1.0]  # rows 0, 1: argmax = label; row 2: a tie, argmax 0


def test_loss_is_normalised_over_the_whole_batch():
    """Slot weights are summed over every supervised slot of the batch, not averaged per sequence; a
    shared normaliser splits the batch into parts whose losses add up (micro-batches, ranks)."""
    gen = torch.Generator().manual_seed(3)
    draft, target = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    labels, slots, conf = (
        torch.tensor([1, 2, 3, 4]),
        torch.tensor([0, 1, 2, 0]),
        torch.randn(4, generator=gen),
    )
    weights = slot_weights(3, 4.0)
    whole, _ = dspark_loss(draft, target, labels, slots, conf, weights, **LOSS_WEIGHTS)
    seq_a, seq_b = slice(0, 3), slice(3, 4)  # a sequence with three supervised slots, one with one
    parts = [
        dspark_loss(draft[s], target[s], labels[s], slots[s], conf[s], weights, **LOSS_WEIGHTS)[0]
        for s in (seq_a, seq_b)
    ]
    total_weight = weights[slots].sum()
    split = [
        dspark_loss(
            draft[s],
            target[s],
            labels[s],
            slots[s],
            conf[s],
            weights,
            normaliser=total_weight,
            **LOSS_WEIGHTS,
        )[0]
        for s in (seq_a, seq_b)
    ]
    assert (split[0] + split[1]).item() == pytest.approx(whole.item(), rel=1e-6)
    assert (parts[0] + parts[1]).item() / 2 != pytest.approx(whole.item(), rel=1e-3)


def test_confidence_threshold_stops_drafting():
    model = tiny_dspark(QWEN3, "gated").eval()
    _, feats = random_sequences(lengths=(12,))[0]
    full = model.propose(feats[:6], 9)
    c = full.confidence.tolist()
    for t in c:
        cut = model.propose(feats[:6], 9, confidence_threshold=t)
        length = next((i for i, x in enumerate(c) if x < t), BLOCK)
        assert cut.tokens == full.tokens[:length] and cut.probs.shape == (length, 50)
    with torch.no_grad():
        model.confidence_head.proj.weight.zero_()
        model.confidence_head.proj.bias.fill_(math.log(0.8 / 0.2))  # c_k = 0.8 everywhere
    assert len(model.propose(feats[:6], 9, confidence_threshold=0.5).tokens) == BLOCK
    none = model.propose(feats[:6], 9, confidence_threshold=0.9)
    assert none.tokens == [] and none.probs.shape == (0, 50) and none.confidence.shape == (0,)


@pytest.mark.parametrize("head", HEADS)
def test_save_load_round_trip_and_upstream_export(tmp_path, head):
    model = tiny_dspark(QWEN3, head).eval()
    embed, lm_head = model.backbone.embed_tokens.weight.clone(), model.backbone.lm_head.weight.clone()
    save(model, tmp_path / "draft")
    with safe_open(str(tmp_path / "draft" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"fc.weight", "layers.1.self_attn.k_norm.weight", "markov_head.markov_w2.weight"} <= keys
    assert {"confidence_head.proj.weight", "confidence_head.proj.bias"} <= keys
    assert not any(k.startswith(("embed_tokens", "lm_head", "backbone.")) for k in keys)
    loaded = load(tmp_path / "draft", embed, lm_head)
    _, feats = random_sequences(lengths=(12,))[0]
    torch.testing.assert_close(loaded.draft_logits(feats[:5], 7), model.draft_logits(feats[:5], 7))
    torch.testing.assert_close(
        loaded.propose(feats[:5], 7).confidence, model.propose(feats[:5], 7).confidence
    )
    assert "model.safetensors: missing tensor 'embed_tokens.weight'" in validate_export(tmp_path / "draft")

    out = tmp_path / "export"
    assert export(model, out, QWEN3) == "Qwen3DSparkModel"
    # vLLM's qwen3_dspark has only the vanilla head (tests/tasks/test_vllm_dspark_export.py)
    served = [] if head == "vanilla" else [f"config.json: markov_head_type={head!r}: vLLM's Qwen3DSparkModel"]
    assert [p[: len(served[0])] for p in validate_export(out)] == served
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["markov_head_type"] == head
    assert config["sample_from_anchor"] is True  # vLLM's DSpark slot convention, ours
    assert (
        config["markov_rank"] == 8
        and config["enable_confidence_head"]
        and config["confidence_head_with_markov"]
    )
    assert config["layer_types"] == ["full_attention"] * 2 and config["num_target_layers"] == 3
    assert (
        config["block_size"] == BLOCK
        and config["target_layer_ids"] == [0, 1]
        and config["mask_token_id"] == 3
    )
    # transformers reads it as a Qwen3 config carrying the DSpark keys, as upstream's from_pretrained does
    hf = Qwen3Config.from_pretrained(out)
    assert (
        hf.num_hidden_layers == 2
        and hf.markov_rank == 8
        and hf.num_anchors == 8
        and not hf.tie_word_embeddings
    )
    reloaded = load(out, embed, lm_head)
    torch.testing.assert_close(reloaded.draft_logits(feats[:5], 7), model.draft_logits(feats[:5], 7))


def test_export_validation_names_what_upstream_would_miss(tmp_path):
    llama = tiny_dspark(LLAMA)
    # without q/k norms (DFlash's choice for a Llama target): upstream's layers always have them
    cfg = dataclasses.replace(llama.cfg, backbone=dataclasses.replace(llama.cfg.backbone, qk_norm=False))
    no_norms = DSparkDraft(cfg, llama.backbone.embed_tokens.weight, llama.backbone.lm_head.weight)
    export(no_norms, tmp_path / "llama", LLAMA)
    assert "model.safetensors: missing tensor 'layers.0.self_attn.q_norm.weight'" in validate_export(
        tmp_path / "llama"
    )
    qwen = tiny_dspark(QWEN3, "gated")
    export(qwen, tmp_path / "qwen", QWEN3)
    config_file = tmp_path / "qwen" / "config.json"
    config = json.loads(config_file.read_text())
    config["markov_head_type"] = "vanilla"  # gate_proj would be unexpected
    del config["confidence_head_with_markov"]
    config["sample_from_anchor"] = False  # vLLM would read the anchor as a bonus token
    config_file.write_text(json.dumps(config))
    problems = validate_export(tmp_path / "qwen")
    assert "config.json: missing field 'confidence_head_with_markov' (confidence head enabled)" in problems
    assert "model.safetensors: unexpected tensor 'markov_head.gate_proj.weight'" in problems
    assert any(p.startswith("config.json: sample_from_anchor=False: vLLM would") for p in problems)
    assert validate_export(tmp_path / "nowhere") == [
        f"{tmp_path / 'nowhere'}: missing config.json and model.safetensors"
    ]


def test_llama_target_gets_q_and_k_norms_as_upstream_layers_have(tmp_path):
    """DFlash gives a Llama target's draft no q/k norms; DSpark's export layout (`Qwen3DSparkModel`)
    always has them, so `from_target` adds them, on the Llama geometry."""
    model = tiny_dspark(LLAMA)
    assert model.cfg.backbone.qk_norm and model.cfg.backbone.head_dim == 32 // 4
    assert model.backbone.layers[0].self_attn.q_norm.weight.shape == (8,)
    export(model, tmp_path, LLAMA)
    assert validate_export(tmp_path) == []
    reloaded = load(tmp_path, model.backbone.embed_tokens.weight, model.backbone.lm_head.weight)
    assert reloaded.cfg == model.cfg
    _, feats = random_sequences(lengths=(12,))[0]
    torch.testing.assert_close(reloaded.draft_logits(feats[:5], 7), model.draft_logits(feats[:5], 7))


def test_tied_target_exports_its_head_under_both_names(tmp_path):
    """A tied target's LM head is its embedding; safetensors refuses one memory under two names, so
    the export copies it, and upstream's loader finds both."""
    tied = torch.randn(50, 32)
    tied_model = DSparkDraft(tiny_dspark(QWEN3).cfg, tied, tied)
    assert tied_model.backbone.lm_head.weight.data_ptr() == tied_model.backbone.embed_tokens.weight.data_ptr()
    export(tied_model, tmp_path, QWEN3)
    assert validate_export(tmp_path) == []
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("embed_tokens.weight"))
        assert torch.equal(f.get_tensor("lm_head.weight"), tied)


def test_gemma_targets_are_refused_until_the_layer_is_upstreams(tmp_path):
    """Upstream's and vLLM's Gemma4DSparkModel layer is not the Qwen3 one built here: a Gemma target fails
    when the draft is configured, and names the way out; an upstream Gemma4 checkpoint is not loaded."""
    with pytest.raises(ConfigError, match="'gemma3_text' target.*v_norm.*use algo=dflash"):
        tiny_dspark(GEMMA)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma4DSparkModel"]}))
    with pytest.raises(ConfigError, match="Gemma4DSparkModel.*algo=dflash"):
        load(tmp_path, torch.zeros(1, 1), torch.zeros(1, 1))


def test_teacher_is_capped_as_the_target_caps_its_logits(tmp_path):
    model = tiny_dspark(CAPPED)
    assert model.cfg.final_logit_softcapping == 2.0 and tiny_dspark(QWEN3).cfg.final_logit_softcapping is None
    final = torch.randn(5, 32) * 10
    raw = final @ model.backbone.lm_head.weight.t()
    torch.testing.assert_close(model.target_logits(final), 2.0 * torch.tanh(raw / 2.0))
    assert model.target_logits(final).abs().max() < 2.0 < raw.abs().max()
    save(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["final_logit_softcapping"] == 2.0
    reloaded = load(tmp_path, model.backbone.embed_tokens.weight, model.backbone.lm_head.weight)
    assert reloaded.cfg.final_logit_softcapping == 2.0
    with pytest.raises(ConfigError, match="final_logit_softcapping=-1.0"):
        dataclasses.replace(model.cfg, final_logit_softcapping=-1.0)


@pytest.mark.parametrize("head", [*HEADS, "none"])
@pytest.mark.parametrize("target_config", [QWEN3, CAPPED], ids=["qwen3", "qwen3-capped"])
def test_chunked_rows_give_the_loss_and_gradients_of_the_logits_path(target_config, head):
    """forward(chunked=True) + chunked_dspark_loss, and the forward's own loss (`loss_settings`, as the
    trainer runs it: inside the engine's call), against forward() + dspark_loss on the [M, vocab] logits:
    same loss, statistics and gradients, the target's cap included."""
    kwargs = {"rank": 0, "with_markov": False} if head == "none" else {}
    model = tiny_dspark(target_config, "vanilla" if head == "none" else head, **kwargs)
    seqs = random_sequences()
    masks = [torch.ones(12, dtype=torch.long), torch.ones(9, dtype=torch.long)]
    masks[0][3] = 0
    packed, prev, labels, target_hidden = training_batch(model, seqs, loss_masks=masks)
    target_hidden = target_hidden * 10  # large logits: the cap matters
    weights = slot_weights(BLOCK, 4.0)
    results = []
    for path in ("logits", "rows", "forward"):
        model.zero_grad()
        if path == "forward":
            settings = SimpleNamespace(loss_decay=4.0, **LOSS_WEIGHTS)
            loss, stats = model(packed, prev, labels, target_hidden=target_hidden, loss_settings=settings)
        elif path == "rows":
            out = model(packed, prev, labels, target_hidden=target_hidden, chunked=True)
            markov = None if out.codes is None else (out.codes, model.markov_head.markov_w2.weight)
            loss, stats = chunked_dspark_loss(
                out.hidden, model.backbone.lm_head.weight, out.labels, out.slots, out.confidence_logits,
                weights, target_hidden=out.target_hidden, markov=markov,
                target_softcap=model.cfg.final_logit_softcapping, chunk_rows=3, **LOSS_WEIGHTS,
            )  # fmt: skip
        else:
            out = model(packed, prev, labels, target_hidden=target_hidden)
            loss, stats = dspark_loss(
                out.draft_logits, out.target_logits, out.labels, out.slots, out.confidence_logits,
                weights, **LOSS_WEIGHTS,
            )  # fmt: skip
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss, stats, grads))
    (ref_loss, ref_stats, ref_grads), *others = results
    for loss, stats, grads in others:
        torch.testing.assert_close(loss, ref_loss)
        for key in ("slot_counts", "slot_hits", "slot_accept"):
            torch.testing.assert_close(stats[key], ref_stats[key])
        assert grads.keys() == ref_grads.keys() and "backbone.fc.weight" in grads
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="markov_head_type='lstm'"):
        tiny_dspark(QWEN3, "lstm")
    with pytest.raises(ConfigError, match="needs a Markov head"):
        DSparkConfig.from_target(
            QWEN3, num_layers=1, block_size=2, layer_ids=[0], mask_token_id=0, markov_rank=0,
            markov_head_type="vanilla", confidence_head=True, confidence_head_with_markov=True, num_anchors=1,
        )  # fmt: skip
    (tmp_path / "config.json").write_text('{"architectures": ["DFlashDraftModel"]}')
    with pytest.raises(ConfigError, match="Qwen3DSparkModel"):
        load(tmp_path, torch.zeros(1, 1), torch.zeros(1, 1))


def test_settings_problems_name_the_keys():
    """The algo section's checks, which compose runs before any stage."""
    good = dict(
        name="dspark", block_size=7, num_layers=5, loss_decay=4.0, anchors_per_sequence=64, markov_rank=256,
        markov_head_type="vanilla", confidence_head=True, confidence_head_with_markov=True, ce_weight=0.1,
        l1_weight=0.9, confidence_weight=1.0,
    )  # fmt: skip
    assert DSparkSettings(**good).problems([1, 9, 17], 36) == []
    bad = DSparkSettings(**{**good, "block_size": 0, "markov_rank": 0, "l1_weight": -1.0, "loss_decay": 0})
    problems = "\n".join(bad.problems([1, 9, 17], 36))
    for key in ("algo.block_size=0", "algo.loss_decay=0", "algo.l1_weight=-1.0", "needs a Markov head"):
        assert key in problems


# --- the real tiny model ---

LAYER_IDS = [0, 2, 4]


@pytest.fixture(scope="module")
def stories(stories260k):
    return stories260k


def stories_draft(target, head="rnn") -> DSparkDraft:
    torch.manual_seed(0)
    cfg = DSparkConfig.from_target(
        target.config, num_layers=1, block_size=BLOCK, layer_ids=LAYER_IDS, mask_token_id=0, markov_rank=16,
        markov_head_type=head, confidence_head=True, confidence_head_with_markov=True, num_anchors=8,
    )  # fmt: skip
    embed = target.get_input_embeddings().weight.detach().clone()
    return DSparkDraft(cfg, embed, target.get_output_embeddings().weight.detach().clone())


def test_stories260k_greedy_speculative_decoding_is_lossless(stories):
    from deepspec.models.speculative import speculative_generate, target_generate

    target, tokenizer = stories
    draft = stories_draft(target).eval()
    prompt = tokenizer("Once upon a time, there was a little dog").input_ids
    kwargs = {"max_new_tokens": 24, "temperature": 0.0, "eos_token_ids": {2}}
    spec = speculative_generate(target, LAYER_IDS, draft, prompt, **kwargs)
    assert spec.tokens == target_generate(target, LAYER_IDS, prompt, **kwargs)
    assert spec.accepted and all(0 <= a <= BLOCK for a in spec.accepted)


def test_stories260k_teacher_and_training_steps(stories):
    from deepspec.models.target import capture_features

    target, tokenizer = stories
    ids = torch.tensor(tokenizer("Lily wanted to play with her ball in the park. She ran and ran.").input_ids)
    with torch.no_grad():
        features = capture_features(target, ids[None], LAYER_IDS)[0]
        final = target.model(input_ids=ids[None]).last_hidden_state[0]
        logits = target(input_ids=ids[None]).logits[0]
    draft = stories_draft(target)
    torch.testing.assert_close(draft.target_logits(final), logits, atol=1e-4, rtol=1e-4)

    anchors = torch.tensor([1, 4, 8])
    labels = block_labels(ids, torch.ones_like(ids), anchors, BLOCK)
    packed = pack_blocks([(ids, features)], [anchors], BLOCK, 0)
    prev, teacher = block_rows(ids, anchors, BLOCK), block_rows(final, anchors, BLOCK)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        batch = draft(packed, prev, labels, target_hidden=teacher)
        loss, stats = dspark_loss(
            batch.draft_logits, batch.target_logits, batch.labels, batch.slots, batch.confidence_logits,
            slot_weights(BLOCK, 4.0), **LOSS_WEIGHTS,
        )  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.8 * losses[0], losses
    assert stats["slot_counts"].tolist() == [3.0] * BLOCK
