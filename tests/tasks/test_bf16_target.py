"""Every algorithm trains, evaluates and exports on a bfloat16 target, as the Qwen3 and Gemma presets load
theirs: stories260k loaded in bf16, and a tiny random Qwen3 saved in bf16 with the real Qwen3 tokenizer.
On a bf16 target greedy_match may read below 1 (bf16 rounding, said in the results), and
eval.target_dtype=float32 brings it back to 1."""

from __future__ import annotations

import pytest
import torch
from support.stories import build_cache_untracked, stories_overrides, write_answers
from transformers import AutoConfig, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from deepspec.models.drafts import DRAFTS, draft_spec, load_draft
from deepspec.models.target import load_embedding_and_head, load_target, load_tokenizer
from deepspec.models.teacher import Teacher
from deepspec.tasks.cache.loader import open_stream
from deepspec.tasks.config import algo_settings, compose
from deepspec.tasks.evaluate.stage import evaluate
from deepspec.tasks.export import export
from deepspec.tasks.paths import run_paths
from deepspec.tasks.train.recipe import draft_inputs

SMALL = {
    "dflash": ["algo.num_layers=1", "algo.block_size=3"],
    "eagle3": ["algo.ttt_steps=3", "algo.draft_vocab_size=null"],
    "dspark": ["algo.num_layers=1", "algo.block_size=3", "algo.markov_rank=8"],
}
EVAL = ["eval.benchmarks=[gsm8k]", "eval.max_samples=1", "eval.max_new_tokens=6"]


def _build_cache(overrides: list[str]) -> None:
    write_answers(overrides)
    build_cache_untracked(overrides)


@pytest.fixture(scope="module")
def stories_bf16(assets_dir, tmp_path_factory, tracking_uri, one_thread) -> list[str]:
    """stories260k in bfloat16, answers and a cache of layers 0, 1, 2 (features of the bf16 target)."""
    overrides = stories_overrides(
        assets_dir, tmp_path_factory.mktemp("bf16"), "target.dtype=bfloat16", "target.layer_ids=[0,1,2]",
        f"tracking.uri={tracking_uri}",
    )  # fmt: skip
    _build_cache(overrides)
    return overrides


@pytest.fixture(scope="module")
def qwen3_bf16(assets_dir, tmp_path_factory, tracking_uri, one_thread) -> list[str]:
    """A random 3-layer Qwen3 of width 32 on the real Qwen3 tokenizer, saved in bfloat16, as the qwen3_4b
    preset loads it (chat template, thinking off), with answers and a cache."""
    tokenizer = AutoTokenizer.from_pretrained(assets_dir / "tokenizers" / "qwen3")
    config = Qwen3Config(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("qwen3") / "model"
    Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    overrides = [
        "target=qwen3_4b", f"target.path={model_dir}", "target.hidden_size=32", "target.num_hidden_layers=3",
        "target.layer_ids=[0,1,2]", f"run_dir={tmp_path_factory.mktemp('qwen3-run')}",
        "storage.samples_per_shard=2", f"tracking.uri={tracking_uri}",
    ]  # fmt: skip
    _build_cache(overrides)
    return overrides


def train_briefly(cfg, steps: int) -> torch.nn.Module:
    """What the train recipe builds (its embedding and head in float32, its teacher in target.dtype),
    trained for a few micro-batches in `train.precision` (bf16: DeepSpeed holds the draft in bfloat16),
    saved where the train stage saves it."""
    t = cfg.target
    spec, settings = draft_spec(cfg.algo.name), algo_settings(cfg)
    embed, head = load_embedding_and_head(t.path, t.gguf_file, t.revision, "float32")
    target_config = AutoConfig.from_pretrained(t.path)
    teacher = None
    if spec.needs_teacher:
        teacher = Teacher.for_target(
            target_config.get_text_config(), head, list(t.layer_ids), torch.device("cpu"),
            online=cfg.storage.mode == "online", path=t.path, dtype=t.dtype,
        )  # fmt: skip
    torch.manual_seed(0)
    draft = spec.build(settings, draft_inputs(cfg, load_tokenizer(t.path), target_config, embed, head))
    if cfg.train.precision == "bf16":
        draft.to(torch.bfloat16)
    samples = list(open_stream(cfg, epochs=1, final_hidden=teacher is not None))
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss, _ = spec.training_loss(
            draft, draft, samples, settings, teacher, torch.Generator().manual_seed(0)
        )
        assert torch.isfinite(loss), loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    spec.save(draft.float(), run_paths(cfg).draft_dir)
    return draft


def evaluate_and_export(cfg) -> None:
    """The evaluate stage greedy on the bf16 target, with its note on greedy_match; the export stage, and
    its export loaded back on the bf16 target's embedding and head, drafting in bf16."""
    results = evaluate(cfg)
    assert results.greedy_match_note is not None and "bfloat16" in results.greedy_match_note
    assert 1 <= results.pooled.new_tokens <= 6

    record = export(cfg)
    assert DRAFTS[cfg.algo.name].validate_export(record.path) == []
    target, tokenizer = load_target(cfg.target.path, None, None, cfg.target.dtype)
    assert target.dtype == torch.bfloat16
    draft = load_draft(
        record.path, target.get_input_embeddings().weight, target.get_output_embeddings().weight
    )
    assert {p.dtype for p in draft.parameters()} == {torch.bfloat16}
    ids = torch.tensor(tokenizer("Once upon a time").input_ids)
    with torch.no_grad():
        states = target.model(input_ids=ids[None], output_hidden_states=True).hidden_states
    features = torch.cat([states[i + 1][0] for i in cfg.target.layer_ids], dim=-1)
    extra = {"context_ids": ids[:-1]} if cfg.algo.name == "eagle3" else {}
    logits = draft.draft_logits(features[:-1], int(ids[-1]), **extra)
    assert logits.shape == (draft.num_draft_tokens, target.config.vocab_size) and logits.isfinite().any()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("algo", list(SMALL))
def test_stories_bf16_target_trains_evaluates_and_exports(stories_bf16, algo, precision):
    cfg = compose([*stories_bf16, f"algo={algo}", *SMALL[algo], f"train.precision={precision}", *EVAL])
    train_briefly(cfg, steps=3)
    evaluate_and_export(cfg)


@pytest.mark.parametrize("algo", list(SMALL))
def test_tiny_qwen3_bf16_target_trains_evaluates_and_exports(qwen3_bf16, algo):
    cfg = compose([*qwen3_bf16, f"algo={algo}", *SMALL[algo], "train.precision=bf16", *EVAL])
    train_briefly(cfg, steps=2)
    evaluate_and_export(cfg)


def test_float32_verification_gives_greedy_match_one(stories_bf16):
    """The same draft and prompts: verified in bf16, some outputs differ from plain bf16 decoding (a
    5-token verify forward and a one-token forward round apart); in float32, none does."""
    base = [*stories_bf16, "algo=dspark", "algo.num_layers=1", "algo.block_size=4", "algo.markov_rank=16",
            "eval.benchmarks=[gsm8k,alpaca]", "eval.max_samples=2", "eval.max_new_tokens=16"]  # fmt: skip
    train_briefly(compose(base), steps=0)  # untrained: its drafts are mostly rejected
    in_bf16 = evaluate(compose(base))
    in_fp32 = evaluate(compose([*base, "eval.target_dtype=float32"]))
    assert in_bf16.greedy_match_note is not None and in_bf16.pooled.greedy_match < 1.0
    assert in_fp32.greedy_match_note is None and in_fp32.pooled.greedy_match == 1.0
