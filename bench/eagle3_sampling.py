"""Eagle3 at temperature 1: tau of the sampled chain (`propose`, each step fed the token drawn at the step
before) against the argmax chain (`draft_logits`, rows drawn from afterwards), same draft, prompts, seeds.

    .venv/bin/python bench/eagle3_sampling.py                  # stories260k: ~3 min on one idle core
    .venv/bin/python bench/eagle3_sampling.py --steps 400 --prompts 32

The draft is a small Eagle3 of stories260k (`tests/support/eagle3.py`) trained full-batch on stories the
target samples at temperature 1 (its own law, which a temperature-1 draft must learn). The prompts are the
first tokens of other such samples. Both chains are lossless; only acceptance differs. Greedy tau is
printed beside them for scale. The figures go to bench/results/eagle3_sampling-stories260k-<date>.json.
"""

from __future__ import annotations

import argparse

import torch
from common import ASSETS, begin, say, write_results

from deepspec.models.speculative import acceptance_stats, speculative_generate
from deepspec.models.target import load_target

LAYER_IDS = [0, 2, 4]


class ArgmaxChain:
    """The draft without `propose`: `speculative_generate` drafts from its argmax-fed chain's rows."""

    def __init__(self, draft):
        self.draft, self.num_draft_tokens = draft, draft.num_draft_tokens

    def draft_logits(self, context_features, anchor_token, *, context_ids):
        return self.draft.draft_logits(context_features, anchor_token, context_ids=context_ids)


def tau(model, drafter, prompts: list[list[int]], *, temperature: float, max_new_tokens: int) -> dict:
    """Acceptance over every prompt, prompt i decoded with seed i."""
    results = [
        speculative_generate(
            model,
            LAYER_IDS,
            drafter,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_token_ids=set(),
            generator=torch.Generator().manual_seed(i),
        )  # fmt: skip
        for i, prompt in enumerate(prompts)
    ]
    stats = acceptance_stats(results)
    return {key: stats[key] for key in ("tau", "accept_at", "steps", "tokens")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ttt-steps", type=int, default=4, help="chain length drafted per round")
    parser.add_argument("--steps", type=int, default=200, help="full-batch training steps")
    parser.add_argument("--train-samples", type=int, default=64, help="target samples to train on")
    parser.add_argument("--length", type=int, default=48, help="tokens per training sample")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--prompt-tokens", type=int, default=6, help="tokens of each prompt, BOS included")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    begin("eagle3_sampling")
    torch.set_num_threads(args.threads)
    from support.eagle3 import target_samples, train_eagle3

    model, tokenizer = load_target(str(ASSETS / "models" / "stories260k"))
    bos = tokenizer.bos_token_id
    train = target_samples(model, bos, args.train_samples, args.length, seed=0)
    say(f"training Eagle3 (ttt_steps={args.ttt_steps}) for {args.steps} steps on {len(train)} samples")
    draft = train_eagle3(model, train, LAYER_IDS, ttt_steps=args.ttt_steps, steps=args.steps)
    prompts = target_samples(model, bos, args.prompts, args.prompt_tokens, seed=1).tolist()
    decode = {"max_new_tokens": args.max_new_tokens}
    figures = {}
    for name, drafter, temperature in [
        ("sampled_chain_t1", draft, 1.0),
        ("argmax_chain_t1", ArgmaxChain(draft), 1.0),
        ("greedy_t0", draft, 0.0),
    ]:
        say(f"decoding {len(prompts)} prompts: {name}")
        figures[name] = tau(model, drafter, prompts, temperature=temperature, **decode)
    print(f"{'chain':<18} {'T':>3} {'tau':>6}  accept@k")
    for name, f in figures.items():
        rates = " ".join(f"{r:.2f}" for r in f["accept_at"] if r is not None)
        print(f"{name:<18} {name[-1]:>3} {f['tau']:6.3f}  {rates}")
    write_results(figures, target="stories260k", args=args)


if __name__ == "__main__":
    main()
