"""bench/decode_split.py compares each first draft with the guess transformers' prompt lookup would make at
the same position: its `lookup_guess` must be transformers' own rule (PromptLookupCandidateGenerator)."""

import importlib.util
import random
import sys
from pathlib import Path

import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_decode_split():
    sys.path.insert(0, str(BENCH))  # the bench's own imports (common, round_timing)
    try:
        spec = importlib.util.spec_from_file_location("decode_split", BENCH / "decode_split.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def transformers_guess(ids: list[int]) -> int | None:
    lookup = PromptLookupCandidateGenerator(num_output_tokens=1, max_length=len(ids) + 8)
    out, _ = lookup.get_candidates(torch.tensor([ids]))
    return int(out[0, -1]) if out.shape[1] > len(ids) else None


def test_lookup_guess_is_transformers_prompt_lookup_of_one_token():
    guess = load_decode_split().lookup_guess
    rng = random.Random(0)
    found = silent = 0
    for _ in range(400):
        ids = [rng.randrange(rng.choice([3, 6, 20])) for _ in range(rng.randrange(1, 24))]
        expected = transformers_guess(ids)
        assert guess(ids) == expected, ids
        found += expected is not None
        silent += expected is None
    assert found > 100 and silent > 20  # both branches (a bigram, a unigram, nothing) were exercised
    # the leftmost earlier occurrence wins, and a bigram match before a unigram one
    assert guess([5, 1, 7, 5, 2, 5]) == 1
    assert guess([1, 2, 9, 2, 3, 1, 2]) == 9
