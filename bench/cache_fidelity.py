"""Teacher fidelity per feature encoding: how much of the target's own next-token distribution survives
each encoding, free of training noise.

    .venv/bin/python bench/cache_fidelity.py                        # stories260k, every encoding: ~3 min
    .venv/bin/python bench/cache_fidelity.py --prompts 48           # a quick check: ~30 s
    .venv/bin/python bench/cache_fidelity.py --target smollm2       # SmolLM2 (`make assets`): ~6 min
    .venv/bin/python bench/cache_fidelity.py --encodings int4 int4_rot int4_mixed

The real stages (`prepare_prompts`, `regenerate`, `build_cache` once per encoding on the same answers)
build one cache per encoding. For every supervised position of the cache, the teacher that Eagle3 and
DSpark training recompute from a cache (`models.teacher.Teacher`: the decoded feature of the last
captured layer through the target's remaining layers, its final norm and LM head) is compared with the
target's own distribution, its LM head on the final hidden state of a full forward over the same tokens
(`models.target.capture_batches`): top-1 agreement and KL(true || encoded) in nats. bf16's residue is
the cache's bf16 rounding of the feature; the rest is the encoding's own loss.

The table goes to stdout, progress to stderr, every figure to the results JSON
(bench/results/cache_fidelity-<target>-<date>.json). Runtimes are for an otherwise idle 2-core machine.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from common import (
    add_data_args,
    begin,
    build_caches,
    chosen_encodings,
    prepare_data,
    read_samples,
    say,
    work_dir,
    write_results,
)
from transformers import AutoConfig

from deepspec.models.target import capture_batches, load_target, output_head, resolve_source
from deepspec.models.teacher import Teacher
from deepspec.tasks.cache.format import iter_samples
from deepspec.tasks.cache.stage import TOKENS_PER_BATCH


@torch.no_grad()
def true_log_probs(model, samples, layer_ids, pad_id: int, softcap: float | None) -> dict[str, torch.Tensor]:
    """The target's log-probabilities at each sample's supervised positions, by sample id: its LM head
    on the final hidden state of one forward over the sample's tokens (batched as the cache stage runs
    the target)."""
    head = output_head(model)
    truth = {}
    sequences = [s["input_ids"].tolist() for s in samples]
    for batch in capture_batches(
        model, sequences, layer_ids, pad_id=pad_id, tokens_per_batch=TOKENS_PER_BATCH, final_hidden=True
    ):
        for i, final in zip(batch.indices, batch.final_hidden, strict=True):
            logits = head(final).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            mask = samples[i]["loss_mask"].bool()
            truth[samples[i]["sample_id"]] = torch.log_softmax(logits[mask], -1)
    return truth


@torch.no_grad()
def teacher_fidelity(base, caches) -> dict[str, Any]:
    """Per encoding: top-1 agreement and KL of the recomputed teacher against the target's true
    distribution, over every supervised position of the cache."""
    t = base.target
    model, tokenizer = load_target(t.path, t.gguf_file, t.revision, t.dtype)
    text_config = AutoConfig.from_pretrained(resolve_source(t.path, t.gguf_file)).get_text_config()
    layer_ids = list(t.layer_ids)
    teacher = Teacher.for_target(
        text_config, output_head(model).weight, layer_ids, torch.device("cpu"), online=False,
        path=t.path, gguf_file=t.gguf_file, revision=t.revision, dtype=t.dtype,
    )  # fmt: skip
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    softcap = getattr(text_config, "final_logit_softcapping", None)
    reference = next(iter(caches.values()))  # every cache holds the same samples
    truth = true_log_probs(model, read_samples(reference), layer_ids, pad_id, softcap)
    out: dict[str, Any] = {}
    for name, cache in caches.items():
        agree = kl = count = 0.0
        for sample in iter_samples(cache.url):
            mask = sample["loss_mask"].bool()
            true_logp = truth[sample["sample_id"]]
            logp = torch.log_softmax(teacher.logits(teacher.final_hidden(sample))[mask], -1)
            agree += float((logp.argmax(-1) == true_logp.argmax(-1)).sum())
            kl += float((true_logp.exp() * (true_logp - logp)).sum())
            count += int(mask.sum())
        out[name] = {"top1_agreement": agree / count, "kl_nats": kl / count, "positions": int(count)}
        say(f"teacher fidelity {name}: top-1 {agree / count:.4f}, KL {kl / count:.5f} nats")
    return {"layer": max(layer_ids), "tail": teacher.tail is not None, "encodings": out}


def print_fidelity(result: dict[str, Any]) -> None:
    n = next(iter(result["encodings"].values()))["positions"]
    how = "through the target's remaining layers" if result["tail"] else "(the final layer: no layers to run)"
    print(
        f"\n== Teacher fidelity: the target's next-token distribution recomputed from the decoded feature of "
        f"layer {result['layer']} {how},\nthen its final norm and LM head, against the target's own logits; "
        f"{n:,} supervised positions of the cache."
    )
    header = f"{'encoding':<15}{'top-1 agreement':>17}{'KL(true || enc) nats':>22}"
    print(header)
    print("-" * len(header))
    for name, r in result["encodings"].items():
        print(f"{name:<15}{r['top1_agreement']:>17.4f}{r['kl_nats']:>22.5f}")
    print("bf16's residue is the cache's bf16 rounding of the feature; the rest is the encoding's own loss.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser, encodings_help="encodings to build and compare (default: all; bf16 always)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)  # the machine's 2 cores
    begin("cache_fidelity")
    data = prepare_data(args.target, work_dir(args), prompts=args.prompts)
    caches = build_caches(data.overrides, chosen_encodings(args))
    figures = {"data": data.summary, "teacher_fidelity": teacher_fidelity(data.cfg, caches)}
    print_fidelity(figures["teacher_fidelity"])
    write_results(figures, target=args.target, args=args, out=args.out)


if __name__ == "__main__":
    main()
