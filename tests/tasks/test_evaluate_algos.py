"""The evaluate stage loads whichever draft the train stage wrote (Eagle3, DSpark), runs it through
speculative decoding greedily and sampled, and refuses a draft of another algorithm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.drafts import save_untrained_draft

from deepspec.models.errors import ConfigError, DeepSpecError
from deepspec.models.target import load_target
from deepspec.tasks.config import compose
from deepspec.tasks.evaluate.stage import evaluate
from deepspec.tasks.export import export
from deepspec.tasks.paths import run_paths

SMALL = {
    "eagle3": ["algo.ttt_steps=3", "algo.draft_vocab_size=null"],
    "dspark": ["algo.num_layers=1", "algo.block_size=4", "algo.markov_rank=16"],
}


@pytest.mark.parametrize(
    "algo, temperature, threshold",
    [("eagle3", 0.0, 0.0), ("dspark", 0.0, 0.0), ("dspark", 1.0, 0.0), ("dspark", 0.0, 0.6)],
)
def test_evaluate_runs_the_trained_draft(assets_dir, tracking_uri, tmp_path, algo, temperature, threshold):
    stories = assets_dir / "models" / "stories260k"
    torch.set_num_threads(1)
    cfg = compose(
        ["target=stories260k", f"target.path={stories}", f"run_dir={tmp_path}", f"algo={algo}", *SMALL[algo],
         "eval.benchmarks=[gsm8k,alpaca]", "eval.max_samples=1", "eval.max_new_tokens=8",
         f"eval.temperature={temperature}", f"eval.confidence_threshold={threshold}",
         f"tracking.uri={tracking_uri}"]
    )  # fmt: skip
    target, _ = load_target(str(stories))
    draft = save_untrained_draft(cfg, target)

    results = evaluate(cfg)
    assert results.algo == algo and results.num_draft_tokens == draft.num_draft_tokens
    overall = results.pooled
    assert overall.samples == 2 and 1 <= overall.new_tokens <= 16
    assert overall.greedy_match == (1.0 if temperature == 0 else None)
    assert overall.tau is None or 1.0 <= overall.tau <= draft.num_draft_tokens + 1
    assert results.confidence_threshold == threshold
    if threshold > 0:  # an untrained head's c_k sit near 0.5: the threshold cuts rounds short
        assert overall.stopped_early > 0 and overall.propose < draft.num_draft_tokens
    elif algo == "dspark":  # the confidence head's outputs, per position, for the rounds that reached it
        assert overall.stopped_early == 0 and overall.propose == draft.num_draft_tokens
        assert overall.confidence is not None and len(overall.confidence.mean) == draft.num_draft_tokens
        assert all(0 < c < 1 for c in overall.confidence.mean if c is not None)
        # calibration, in results.json and in each prompt's record: STS temperatures for every slot
        assert len(overall.confidence.sts_temperatures) == draft.num_draft_tokens
        assert len(overall.confidence.prefix_ece) == draft.num_draft_tokens
        records = [json.loads(line) for line in Path(results.prompts_file).read_text().splitlines()]
        assert all(len(c) == p for r in records for c, p in zip(r["confidence"], r["proposed"], strict=True))
        # the prefix scheduler serves beside fixed lengths, on the temperatures fitted to these rounds
        serving = results.serving
        assert serving.temperatures == overall.confidence.sts_temperatures
        assert serving.temperatures_from == "these rounds (in-sample)"
        assert all(0 <= row["scheduler"]["mean_length"] <= draft.num_draft_tokens for row in serving.rows)
        assert "scheduler tok/s" in (run_paths(cfg).eval_dir / "report.md").read_text()
    else:
        assert overall.confidence is None and overall.stopped_early == 0

    # the trained draft of another algorithm is in its own folder: a dflash evaluation finds none
    dflash = compose(["target=stories260k", f"target.path={stories}", f"run_dir={tmp_path}"])
    with pytest.raises(DeepSpecError, match=r"no trained draft at .*train/dflash"):
        evaluate(dflash)
    (tmp_path / "train" / algo).rename(tmp_path / "train" / "dflash")  # another algorithm's, by hand
    with pytest.raises(ConfigError, match=f"is a {algo} draft, but algo=dflash"):
        evaluate(dflash)


def test_dspark_confidence_is_calibrated_on_held_out_prompts(assets_dir, tracking_uri, tmp_path):
    """eval.calibration_prompts: STS fitted on the prompts stage's held-out prompts, saved beside the draft
    and carried by the export; the benchmarks' prefix ECE after it is in the results."""
    stories = assets_dir / "models" / "stories260k"
    torch.set_num_threads(1)
    cfg = compose(
        ["target=stories260k", f"target.path={stories}", f"run_dir={tmp_path}", "algo=dspark",
         *SMALL["dspark"], "eval.benchmarks=[gsm8k]", "eval.max_samples=1", "eval.max_new_tokens=8",
         "eval.calibration_prompts=2", f"tracking.uri={tracking_uri}"]
    )  # fmt: skip
    target, _ = load_target(str(stories))
    draft = save_untrained_draft(cfg, target)
    with pytest.raises(DeepSpecError, match=r"heldout.jsonl does not exist; run `deepspec prompts`"):
        evaluate(cfg)

    heldout = run_paths(cfg).heldout
    heldout.parent.mkdir(parents=True)
    texts = ["Once upon a time", "The dog ran", "never read: past the cap"]
    rows = [{"id": str(i), "source": "t", "category": "c", "conversations": [{"role": "user", "content": t}]}
            for i, t in enumerate(texts)]  # fmt: skip
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    results = evaluate(cfg)
    sts = json.loads((run_paths(cfg).draft_dir / "sts.json").read_text())
    assert sts["prompts"] == 2 and sts["rounds"] > 0 and len(sts["temperatures"]) == draft.num_draft_tokens
    heldout_figures = results.pooled.confidence.sts_heldout
    assert heldout_figures["temperatures"] == sts["temperatures"]
    assert len(heldout_figures["prefix_ece"]) == draft.num_draft_tokens
    assert "prefix ECE (held-out STS)" in (run_paths(cfg).eval_dir / "report.md").read_text()
    assert results.serving.temperatures == sts["temperatures"]  # the scheduler's survivals use them
    assert results.serving.temperatures_from == "held-out prompts"

    export(cfg)
    assert json.loads((run_paths(cfg).export_dir / "sts.json").read_text()) == sts
