"""Several requests verified in one target forward, each with its own draft length, stay lossless: greedy
outputs equal the target's alone, sampled ones follow its law, and a broken rule is caught."""

from __future__ import annotations

import itertools

import pytest
import torch
from support.lossless import CHI_TOKENS, bigram_dspark, exact_law, keep_every_draft, pvalue_of

from deepspec.models import speculative
from deepspec.models.batch_speculative import batch_speculative_generate
from deepspec.models.drafts.dflash import DFlashConfig, DFlashDraft
from deepspec.models.prefix_scheduler import StepProfile, scheduled_lengths
from deepspec.models.speculative import speculative_generate, target_generate
from deepspec.models.target import load_target

LAYER_IDS = [0, 2, 4]
PROMPTS = ["Once upon a time, there was a little dog", "Tom and his mom went to the", "Lily wanted to",
           "One day, a"]  # fmt: skip
EOS = {2}


@pytest.fixture(scope="module")
def stories(assets_dir):
    torch.set_num_threads(1)
    path = assets_dir / "models" / "stories260k"
    if not (path / "config.json").is_file():
        pytest.skip(f"stories260k not found in {assets_dir}")
    model, tokenizer = load_target(str(path))
    return model, tokenizer


def untrained_dflash(model) -> DFlashDraft:
    torch.manual_seed(0)
    cfg = DFlashConfig.from_target(
        model.config, num_layers=1, block_size=4, layer_ids=LAYER_IDS, mask_token_id=0
    )
    return DFlashDraft(cfg, model.get_input_embeddings().weight, model.get_output_embeddings().weight).eval()


def cycling_lengths():
    """Per-request draft lengths that change every step and differ between requests: 0, 1, 2, 0, ..."""
    counter = itertools.count()
    return lambda proposals: [next(counter) % 3 for _ in proposals]


@pytest.mark.parametrize("drafter_name", ["bigram-dspark", "untrained-dflash"])
@pytest.mark.parametrize("lengths", ["whole", "cycling"])
def test_greedy_outputs_equal_the_target_alone(stories, drafter_name, lengths):
    model, tokenizer = stories
    drafter = (
        bigram_dspark(model, tokenizer.bos_token_id)
        if drafter_name == "bigram-dspark"
        else untrained_dflash(model)
    )
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    decode = {"max_new_tokens": 20, "temperature": 0.0, "eos_token_ids": EOS}
    choose = cycling_lengths() if lengths == "cycling" else None
    results = batch_speculative_generate(model, LAYER_IDS, drafter, prompts, choose_lengths=choose, **decode)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.tokens == target_generate(model, LAYER_IDS, prompt, **decode)
        alone = speculative_generate(model, LAYER_IDS, drafter, prompt, **decode)
        if choose is None:  # the same drafts as decoding the request alone: the same rounds
            assert result.accepted == alone.accepted
    if drafter_name == "bigram-dspark":
        assert sum(sum(r.accepted) for r in results) > 0  # drafts were kept, not only rejected
    if choose is not None:
        assert 0 in results[0].proposed and 2 in results[0].proposed


def batched_samples(model, drafter, prompt, n_samples, choose=None) -> list[tuple[int, ...]]:
    """`n_samples` continuations of `prompt`, drawn 4 requests to a batch, each with its own generator."""
    samples = []
    for start in range(0, n_samples, 4):
        generators = [torch.Generator().manual_seed(start + i) for i in range(4)]
        results = batch_speculative_generate(
            model, LAYER_IDS, drafter, [prompt] * 4, max_new_tokens=CHI_TOKENS, temperature=1.0,
            eos_token_ids=set(), generators=generators, choose_lengths=choose,
        )  # fmt: skip
        samples += [tuple(r.tokens) for r in results]
    return samples


def test_sampled_outputs_follow_the_targets_law(stories):
    model, tokenizer = stories
    prompt = tokenizer("One day, a").input_ids
    drafter = bigram_dspark(model, tokenizer.bos_token_id)
    samples = batched_samples(model, drafter, prompt, 600, cycling_lengths())
    assert pvalue_of(samples, exact_law(model, prompt, len(samples))) > 0.01


def test_keeping_every_draft_is_caught(stories, monkeypatch):
    model, tokenizer = stories
    prompt = tokenizer("One day, a").input_ids
    monkeypatch.setattr(speculative, "accept_or_resample", keep_every_draft)
    samples = batched_samples(model, bigram_dspark(model, tokenizer.bos_token_id), prompt, 300)
    assert pvalue_of(samples, exact_law(model, prompt, len(samples))) < 0.01


def test_the_prefix_scheduler_chooses_the_lengths_losslessly(stories):
    """DSpark's confidences through Algorithm 1: a profile with room for a few drafts a step verifies
    some drafts and not others, and the outputs stay the target's."""
    model, tokenizer = stories
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    profile = StepProfile([1, 6, 64], [100.0, 100.0, 10.0])  # flat up to 6 tokens a step, then dearer
    decode = {"max_new_tokens": 20, "temperature": 0.0, "eos_token_ids": EOS}
    drafter = bigram_dspark(model, tokenizer.bos_token_id)
    results = batch_speculative_generate(
        model, LAYER_IDS, drafter, prompts, choose_lengths=scheduled_lengths(profile), **decode
    )
    for prompt, result in zip(prompts, results, strict=True):
        assert result.tokens == target_generate(model, LAYER_IDS, prompt, **decode)
    proposed = [n for r in results for n in r.proposed]
    assert 0 < sum(proposed) < 2 * len(proposed) and max(proposed) >= 1  # some drafts, never all of them
