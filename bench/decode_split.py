"""Where a speculative decoding round's time goes (draft, verify, overhead) against context length, and how
close decoding comes to its bound, beside plain decoding and transformers' prompt-lookup `generate`.

    # the reference SmolLM2 drafts (bench/reference.py --target smollm2), ~10 min on one core
    .venv/bin/python bench/decode_split.py runs/bench/reference/smollm2/runs/{dflash,dspark,eagle3}-s0/train/* \
        --prompts 1 --tokens 128
    # the same drafts drafting without their decode caches: every round recomputes the context
    .venv/bin/python bench/decode_split.py runs/bench/reference/smollm2/runs/dflash-s0/train/dflash --no-cache
    # the README's CPU Eagle3 draft at 1 and 2 drafts a round (~6 min)
    .venv/bin/python bench/decode_split.py runs/bench/cpu_draft/e3-t3/train/eagle3 --draft-tokens 1 2 \
        --prompts 2 --tokens 64
    # the README's Eagle3 drafts from all 3,444 answers (2 epochs) and from 600 (8 epochs), 1 draft (~6 min)
    .venv/bin/python bench/decode_split.py runs/bench/cpu_draft/e3-all/train/eagle3 \
        runs/bench/cpu_draft/e3-t3/train/eagle3 --draft-tokens 1 --prompts 2 --tokens 64
    # the README's Eagle3 draft of one test step (algo.ttt_steps=1) beside the 3-step one, same answers
    .venv/bin/python bench/decode_split.py runs/bench/cpu_draft/e3-s1/train/eagle3 \
        runs/bench/cpu_draft/e3-all/train/eagle3 --draft-tokens 1 --prompts 2 --tokens 64
    # the README's Eagle3 draft of one step trained on 512 greedy answers, beside the one on all 3,444
    .venv/bin/python bench/decode_split.py runs/bench/cpu_draft/greedy/e3-g1/train/eagle3 \
        runs/bench/cpu_draft/e3-s1/train/eagle3 --draft-tokens 1 --prompts 2 --tokens 64
    # the CPU Eagle3 draft at 1 and 2 drafts, its 1..3-row products as F.linear (no models/cpu_products.py)
    .venv/bin/python bench/decode_split.py runs/bench/cpu_draft/e3-t3/train/eagle3 --draft-tokens 1 2 \
        --prompts 2 --tokens 64 --no-rows-first

Each argument is a train stage's folder (its `config.yaml` and `draft/`); every draft must share one target.
The prompts are the first `--prompts` of each of the nine benchmark files in `../shared/assets/eval`,
rendered as the evaluate stage renders them, decoded greedily to `--tokens` new tokens by, in turn:
plain decoding (`target_generate`), each draft (`speculative_generate`, the evaluate stage's engine),
and transformers' `generate`, plain and with prompt lookup. One thread, one process, so every figure is
a ratio against a baseline measured in the same run.

Per round, with the engine's own calls timed in place: T_draft (the drafter's call), T_verify (the target's
forward over the anchor and the drafts) and the overhead (the rest of the round: acceptance, bookkeeping).
T1 is plain decoding's time a token (one target forward). The bound on speedup is
tau * T1 / (T_verify + T_draft): what decoding would reach with no overhead; efficiency = achieved / bound,
where achieved = (plain decode s/token) / (speculative decode s/token), prefills left out of both.

Each round is also held against prompt lookup: would transformers' lookup of 1 token (`lookup_guess`, its
rule) have guessed the position of the round's first draft from the same context? Shares of rounds where
the draft, the lookup, or both were right, and where the lookup had no guess, overall and by benchmark.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from common import ASSETS, begin, eval_prompts, say, write_results
from round_timing import Clock, TimedDrafter, binned, mean, rounds_of, timed_runner

# transformers' documented n-gram draft length (10), and short ones, as a verify of 11 tokens costs a CPU
# ~2.5 forwards of one; 1 verifies 2 tokens, as a draft of one a round does (the same target products)
PROMPT_LOOKUP_TOKENS = (10, 3, 1)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("drafts", type=Path, nargs="+", help="train stage folders (config.yaml and draft/)")
    p.add_argument("--prompts", type=int, default=1, help="prompts per benchmark (9 benchmarks)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per prompt")
    p.add_argument("--eval-dir", type=Path, default=ASSETS / "eval", help="<benchmark>.jsonl files")
    p.add_argument("--no-cache", action="store_true", help="draft without the decode caches (the old engine)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate baselines")
    p.add_argument(
        "--no-rows-first",
        action="store_true",
        help="the target's and drafts' products of 1..3 rows as F.linear, not W @ x.T (before "
        "models/cpu_products.py)",
    )
    p.add_argument(
        "--draft-tokens",
        type=int,
        nargs="+",
        metavar="N",
        help="tokens drafted a round, as eval.num_draft_tokens: every draft is run at each N (default: "
        "its own count; Eagle3 any, DFlash and DSpark at most a block)",
    )
    p.add_argument("--out", type=Path, help="results JSON (bench/results/decode_split-<target>-<date>.json)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    begin("decode_split")
    from omegaconf import OmegaConf

    from deepspec.models import speculative
    from deepspec.models.cpu_products import multiply_as_f_linear, rows_first_sizes
    from deepspec.models.drafts import load_draft, set_num_draft_tokens
    from deepspec.models.speculative import acceptance_stats, speculative_generate, target_generate
    from deepspec.models.target import input_embeddings, load_target, output_head
    from deepspec.tasks.evaluate.stage import stop_token_ids

    cfgs = {d: OmegaConf.load(d / "config.yaml") for d in args.drafts}
    cfg = next(iter(cfgs.values()))
    targets = {(c.target.path, c.target.gguf_file) for c in cfgs.values()}
    if len(targets) != 1:
        raise SystemExit(f"the drafts have different targets: {sorted(map(str, targets))}")
    model, tokenizer = load_target(cfg.target.path, cfg.target.gguf_file, cfg.target.revision, "float32")
    if args.no_rows_first:
        multiply_as_f_linear(model)
    rows_first = sorted(rows_first_sizes(model))
    embed, head = input_embeddings(model).weight, output_head(model).weight
    layer_ids = list(cfg.target.layer_ids)
    eos = stop_token_ids(cfg, tokenizer)
    prompts = eval_prompts(cfg, tokenizer, args.eval_dir, args.prompts)
    decode = {"max_new_tokens": args.tokens, "temperature": 0.0, "eos_token_ids": eos}
    say(f"{len(prompts)} prompts, {args.tokens} new tokens, {len(args.drafts)} drafts")

    clock = Clock()
    speculative.TargetRunner = timed_runner(clock)  # the engine's own calls, timed in place

    def run(fn) -> tuple[Any, list, float]:
        clock.events.clear()
        began = time.perf_counter()
        out = fn()
        return out, list(clock.events), time.perf_counter() - began

    # plain decoding: T1 and the decode time a token, prefill left out
    plain_tokens, plain_outputs, steps = 0, [], []
    plain_decode_s = plain_total_s = 0.0
    run(lambda: target_generate(model, layer_ids, prompts[0][1], **{**decode, "max_new_tokens": 4}))  # warm
    for _, ids in prompts:
        tokens, events, total = run(lambda ids=ids: target_generate(model, layer_ids, ids, **decode))
        plain_outputs.append(tokens)
        plain_tokens += len(tokens)
        plain_total_s += total
        plain_decode_s += total - sum(s for kind, _, s in events if kind == "prefill")
        steps += [(c, s) for kind, c, s in events if kind == "step"]
    t1 = plain_decode_s / max(plain_tokens - len(prompts), 1)  # the first token comes with the prefill
    figures: dict[str, Any] = {
        "prompts": len(prompts),
        "tokens": args.tokens,
        "no_cache": args.no_cache,
        "rows_first": rows_first,  # block sizes the target multiplies as W @ x.T (models/cpu_products.py)
        "plain": {"tokens": plain_tokens, "decode_s": plain_decode_s, "total_s": plain_total_s, "t1_s": t1,
                  "t1_by_context": binned([{"context": c, "s": s} for c, s in steps], ["s"])},
        "drafts": {},
    }  # fmt: skip
    say(f"plain: {plain_tokens} tokens, T1 {t1 * 1e3:.1f} ms")

    for folder, count in [(f, n) for f in args.drafts for n in args.draft_tokens or [None]]:
        algo = cfgs[folder].algo.name
        drafter = load_draft(folder / "draft", embed, head).eval()
        if args.no_rows_first:
            multiply_as_f_linear(drafter)
        if count is not None:
            set_num_draft_tokens(drafter, count, "--draft-tokens")
        timed = TimedDrafter(drafter, clock, args.no_cache)
        warm = {**decode, "max_new_tokens": 8}
        run(lambda t=timed, w=warm: speculative_generate(model, layer_ids, t, prompts[0][1], **w))
        results, rounds, decode_s, total_s, equal = [], [], 0.0, 0.0, 0
        for (_, ids), reference in zip(prompts, plain_outputs, strict=True):
            result, events, total = run(
                lambda ids=ids, t=timed: speculative_generate(model, layer_ids, t, ids, **decode)
            )
            results.append(result)
            equal += result.tokens == reference
            rounds += rounds_of(events, total)
            total_s += total
            decode_s += total - sum(s for kind, _, s in events if kind == "prefill")
        stats = acceptance_stats(results)
        tokens = sum(len(r.tokens) for r in results)
        spec_per_token = decode_s / max(tokens - len(prompts), 1)
        td, tv, to = (mean([r[k] for r in rounds]) for k in ("draft_s", "verify_s", "overhead_s"))
        bound = stats["tau"] * t1 / (tv + td)
        achieved = t1 / spec_per_token
        name = f"{algo} ({drafter.num_draft_tokens} drafts)"
        if len(args.drafts) > 1:  # the run folder (<run_dir>/train/<algo>) tells drafts apart
            name += f", {folder.resolve().parent.parent.name}"
        figures["drafts"][f"{folder}" + ("" if count is None else f"@{count}")] = {
            "algo": algo, "name": name, "tau": stats["tau"],
            "drafts_a_round": drafter.num_draft_tokens, "rounds": len(rounds), "greedy_equal": equal,
            "rows_first": sorted(rows_first_sizes(drafter)),  # the draft's own products as W @ x.T
            "draft_s": td, "verify_s": tv, "overhead_s": to, "bound": bound, "achieved": achieved,
            "efficiency": achieved / bound, "decode_s": decode_s, "total_s": total_s, "tokens": tokens,
            "by_context": binned(rounds, ["draft_s", "verify_s", "overhead_s"]),
            "first_draft_vs_lookup": first_draft_vs_lookup(prompts, results),
        }  # fmt: skip
        say(
            f"{name}: tau {stats['tau']:.2f}, {achieved:.2f}x plain (bound {bound:.2f}x), {equal}/{len(prompts)} equal"
        )

    if not args.no_hf:
        figures["hf"] = hf_baselines(model, tokenizer, prompts, args.tokens, sorted(eos))
    print(tables(figures))
    write_results(figures, target=Path(cfg.target.path).name, args=args, out=args.out)


def hf_baselines(model, tokenizer, prompts, max_new_tokens: int, eos: list[int]) -> dict[str, Any]:
    """transformers' `generate`, greedy, plain and with prompt lookup (each of `PROMPT_LOOKUP_TOKENS`):
    tokens and seconds, prefill included."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    modes = {"generate": {}}
    modes.update({f"prompt_lookup_{n}": {"prompt_lookup_num_tokens": n} for n in PROMPT_LOOKUP_TOKENS})
    out = {m: {"tokens": 0, "seconds": 0.0} for m in modes}
    for _, ids in prompts:
        x = torch.tensor([ids])
        for mode, extra in modes.items():
            began = time.perf_counter()
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, eos_token_id=eos,
                               pad_token_id=pad, max_new_tokens=max_new_tokens, **extra)  # fmt: skip
            out[mode]["seconds"] += time.perf_counter() - began
            out[mode]["tokens"] += y.shape[1] - len(ids)
    return out


def lookup_guess(ids: list[int], max_ngram: int = 2) -> int | None:
    """The token transformers' prompt lookup (`PromptLookupCandidateGenerator`, its default n-gram of 2)
    guesses after `ids`: what followed the leftmost earlier occurrence of the last 2 tokens, else of the
    last one; None when neither occurred before."""
    for n in range(min(max_ngram, len(ids) - 1), 0, -1):
        tail = ids[-n:]
        for i in range(len(ids) - n):
            if ids[i : i + n] == tail:
                return ids[i + n]
    return None


# the shares `first_draft_vs_lookup` gives: rounds whose first draft was kept, whose lookup guess was
# right, both, and where the lookup had no guess
LOOKUP_KEYS = ("draft", "lookup", "both", "lookup_silent")


def first_draft_vs_lookup(prompts: list[tuple[str, list[int]]], results: list) -> dict[str, Any]:
    """In each round, was the draft's first token kept, and would prompt lookup of 1 token have guessed
    the same position right (from the same context)? Shares of rounds, overall and by benchmark."""
    tally: dict[str, list[int]] = {}  # benchmark: [rounds, *counts of LOOKUP_KEYS]
    for (bench, ids), result in zip(prompts, results, strict=True):
        t = tally.setdefault(bench, [0] * 5)
        at = 0  # the round's anchor: result.tokens[at]; its first draft guesses result.tokens[at + 1]
        for kept, added in zip(result.accepted, result.committed, strict=True):
            if at + 1 >= len(result.tokens):
                break
            guess = lookup_guess([*ids, *result.tokens[: at + 1]])
            draft_ok, lookup_ok = kept > 0, guess == result.tokens[at + 1]
            for k, hit in enumerate((True, draft_ok, lookup_ok, draft_ok and lookup_ok, guess is None)):
                t[k] += hit
            at += added
    share = lambda t: {k: v / max(t[0], 1) for k, v in zip(LOOKUP_KEYS, t[1:], strict=True)}  # noqa: E731
    total = [sum(col) for col in zip(*tally.values(), strict=True)] if tally else [0] * 5
    return {
        "rounds": total[0],
        **share(total),
        "by_benchmark": {b: {"rounds": t[0], **share(t)} for b, t in tally.items()},
    }


def tables(figures: dict[str, Any]) -> str:
    ms = lambda s: f"{s * 1e3:.1f}" if s is not None else "-"  # noqa: E731
    plain = figures["plain"]
    lines = [
        f"\nper round, greedy, {figures['prompts']} prompts x {figures['tokens']} tokens"
        + (" (no decode caches)" if figures["no_cache"] else "")
        + (
            f", target products of {figures['rows_first']} rows as W @ x.T"
            if figures.get("rows_first")
            else ""
        ),
        "",
        "| draft | tau | T_draft ms | T_verify ms | overhead ms | bound x | achieved x | efficiency | equal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in figures["drafts"].values():
        lines.append(
            f"| {d['name']} | {d['tau']:.2f} | {ms(d['draft_s'])} | {ms(d['verify_s'])} | {ms(d['overhead_s'])} "
            f"| {d['bound']:.2f} | {d['achieved']:.2f} | {d['efficiency']:.0%} | {d['greedy_equal']}/{figures['prompts']} |"
        )
    lines += ["", f"T1 (plain, a token) {ms(plain['t1_s'])} ms", "", "by context length (ms a round):", ""]
    lines += ["| draft | context | rounds | T_draft | T_verify | overhead |", "|---|---|---|---|---|---|"]
    for d in figures["drafts"].values():
        for b in d["by_context"]:
            lines.append(
                f"| {d['name']} | {b['context'][0]}-{b['context'][1] if b['context'][1] < 1 << 29 else ''} "
                f"| {b['count']} | {ms(b['draft_s'])} | {ms(b['verify_s'])} | {ms(b['overhead_s'])} |"
            )
    lines += [
        "",
        "first drafts kept, against prompt lookup of 1 token's guess at the same positions (share of rounds):",
        "",
        "| draft | benchmark | rounds | draft right | lookup right | both | lookup has no guess |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in figures["drafts"].values():
        vs = d["first_draft_vs_lookup"]
        for bench, v in [("all", vs), *vs["by_benchmark"].items()]:
            lines.append(
                f"| {d['name']} | {bench} | {v['rounds']} | {v['draft']:.2f} | {v['lookup']:.2f} | {v['both']:.2f} "
                f"| {v['lookup_silent']:.2f} |"
            )
    if "hf" in figures:
        lines += [
            "",
            "tokens/s, prefill included:",
            "",
            "| decoding | tokens/s | vs generate |",
            "|---|---|---|",
        ]
        rows = {f"transformers {m}": (v["tokens"], v["seconds"]) for m, v in figures["hf"].items()}
        rows["plain (target_generate)"] = (plain["tokens"], plain["total_s"])
        rows.update({d["name"]: (d["tokens"], d["total_s"]) for d in figures["drafts"].values()})
        base = rows["transformers generate"][0] / rows["transformers generate"][1]
        for name, (tokens, seconds) in rows.items():
            lines.append(f"| {name} | {tokens / seconds:.1f} | {tokens / seconds / base:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
