"""The evaluate stage: benchmark files checked line by line, the built-in set, results and re-run skip.

End to end it runs the real stories260k target with a real drafter: the same story model drafting its
greedy chain from the anchor token alone (it ignores the context), which is enough to get acceptances.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from support.stories import stories_overrides

from deepspec.models.chat import render_prompt
from deepspec.models.drafts import dflash
from deepspec.models.errors import DataError, DeepSpecError
from deepspec.models.prefix_scheduler import StepProfile
from deepspec.models.speculative import target_generate
from deepspec.models.target import load_target
from deepspec.tasks import tracking
from deepspec.tasks.config import compose
from deepspec.tasks.evaluate.benchmarks import load_benchmark
from deepspec.tasks.evaluate.stage import RESULTS_FILE, evaluate, serving_metrics
from deepspec.tasks.paths import run_paths
from deepspec.tasks.results import ServingFigures, to_record
from deepspec.tasks.summary import _serving_row


class AnchorChainDrafter:
    """Drafts the greedy chain of a causal LM started from `[bos, anchor]`: no history, no features."""

    def __init__(self, model, block_size: int, bos: int):
        self.model, self.num_draft_tokens, self.bos = model, block_size, bos

    @torch.no_grad()
    def draft_logits(self, context_features, anchor_token):
        seq, rows = [self.bos, anchor_token], []
        for _ in range(self.num_draft_tokens):
            logits = self.model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            rows.append(logits)
            seq.append(int(logits.argmax()))
        return torch.stack(rows)


def test_load_benchmark_names_file_line_and_field(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(
        '{"turns": ["fine"]}\n{not json\n{"prompt": "no turns"}\n{"turns": ["a", 3]}\n\n{"turns": []}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as err:
        load_benchmark("gsm8k", tmp_path)
    message = str(err.value)
    assert "4 bad line(s)" in message
    assert f"{path}:2: not valid JSON" in message
    for line in (3, 4, 6):
        assert f"{path}:{line}: field 'turns'" in message
    assert f"{path}:1:" not in message

    path.write_text('{"turns": ["one"]}\n{"turns": ["two", "three"]}\n', encoding="utf-8")
    assert load_benchmark("gsm8k", tmp_path) == [["one"], ["two", "three"]]


def test_missing_benchmark_file_lists_what_is_there(tmp_path):
    (tmp_path / "alpaca.jsonl").write_text('{"turns": ["hi"]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"mbpp\.jsonl.*does not exist.*alpaca"):
        load_benchmark("mbpp", tmp_path)


def test_builtin_set_covers_every_default_benchmark():
    cfg = compose()
    assert len(cfg.eval.benchmarks) == 9
    for name in cfg.eval.benchmarks:
        prompts = load_benchmark(name, None)
        assert 2 <= len(prompts) <= 3, name
        assert all(turns and all(t.strip() for t in turns) for turns in prompts)
    assert len(load_benchmark("mt-bench", None)[0]) == 2
    with pytest.raises(DataError, match="built-in benchmarks: aime25, alpaca"):
        load_benchmark("no-such-bench", None)


def test_evaluate_end_to_end_and_skip(assets_dir, tracking_uri, tmp_path, caplog):
    stories = assets_dir / "models" / "stories260k"
    if not (stories / "config.json").is_file():
        pytest.skip(f"stories260k not found in {assets_dir}")
    torch.set_num_threads(1)
    cfg = compose(stories_overrides(assets_dir, tmp_path, "eval.max_samples=1", "eval.max_new_tokens=8",
                                    f"tracking.uri={tracking_uri}"))  # fmt: skip
    loads = []

    def draft_loader():
        model, tokenizer = load_target(str(stories))
        loads.append(1)
        return AnchorChainDrafter(model, 3, tokenizer.bos_token_id)

    weights = stories / "model.safetensors"
    with caplog.at_level("WARNING", logger="deepspec.tasks.evaluate.stage"):
        results = evaluate(cfg, draft_loader, weights)
    assert loads == [1]
    assert "built-in prompt set" in caplog.text

    eval_dir = tmp_path / "eval" / "dflash"
    on_disk = json.loads((eval_dir / RESULTS_FILE).read_text())
    assert on_disk == to_record(results)
    assert results.builtin_eval is True and results.skipped is False
    assert results.num_draft_tokens == 3
    assert set(results.benchmarks) == set(cfg.eval.benchmarks)
    for figures in [*results.benchmarks.values(), results.pooled]:
        assert 1 <= figures.new_tokens <= 8 * figures.samples
        assert figures.tau is None or 1.0 <= figures.tau <= 4.0
        assert len(figures.acceptance) == len(figures.accept_at) == len(figures.conditional_acceptance) == 3
        assert figures.confidence is None and figures.stopped_early == 0
        assert figures.speedup > 0
        assert figures.greedy_match == 1.0  # temperature 0: the same tokens as the target alone
    assert results.pooled.samples == 9
    assert results.pooled.tau > 1.0  # the story model guesses some tokens right
    assert (eval_dir / "_DONE.json").is_file()
    assert set(results.domains) == {"math", "code", "chat"}
    for figures, names in [
        (results.domains["math"], ["gsm8k", "math500", "aime25"]),
        (results.macro, cfg.eval.benchmarks),
    ]:
        assert figures.benchmarks == list(names)
        taus = [results.benchmarks[n].tau for n in names if results.benchmarks[n].tau is not None]
        assert figures.tau == pytest.approx(sum(taus) / len(taus))  # unweighted: each benchmark once

    records = [json.loads(line) for line in (eval_dir / "prompts.jsonl").read_text().splitlines()]
    assert results.prompts_file == str(eval_dir / "prompts.jsonl") and len(records) == 9
    for record in records:
        figures = results.benchmarks[record["benchmark"]]
        assert record["index"] == record["row"] == 0  # max_samples=1: the first row of each set
        assert record["rounds"] == len(record["accepted"]) == figures.verify_steps
        assert record["new_tokens"] == figures.new_tokens and record["greedy_match"] is True

    # throughput against concurrency, replayed from these rounds on the target's measured step times
    serving = results.serving
    profile = StepProfile(serving.profile_tokens, serving.profile_steps_per_s, serving.profile_context)
    assert [row["concurrency"] for row in serving.rows] == list(cfg.eval.serving.concurrency)
    assert (
        serving.profile_tokens == list(cfg.eval.serving.profile_tokens)
        and min(serving.profile_steps_per_s) > 0
    )
    assert 0 < serving.draft_s and serving.draft_s * results.pooled.verify_steps < results.pooled.spec_time_s
    assert serving.temperatures_from is None  # no confidence head: fixed lengths only
    for row in serving.rows:
        n, plain = row["concurrency"], row["fixed"][0]
        assert row["scheduler"] is None and len(row["fixed"]) == 4  # plain decoding, then 1 to 3 drafts
        assert (
            plain["tokens_per_s"] == pytest.approx(n * profile(n)) and plain["tokens_per_request_step"] == 1
        )
        assert all(1 < f["tokens_per_request_step"] <= 1 + k for k, f in enumerate(row["fixed"][1:], 1))

    report = (eval_dir / "report.md").read_text()  # tables people read, beside the figures
    assert f"| pooled (micro) | 9 | {results.pooled.tau:.2f} |" in report
    assert "## Serving (simulated)" in report and "## Target steps a second" in report
    plain_1 = serving.rows[0]["fixed"][0]["tokens_per_s"]
    assert f"| 1 | {plain_1:.1f} |" in report
    page = (eval_dir / "report.html").read_text()
    assert page.count("<svg") == 2 and "Serving: dflash on stories260k" in page  # accept@k, serving
    artifacts = MlflowClient(tracking_uri).list_artifacts(tracking.run_id(cfg), "eval")
    assert {a.path for a in artifacts} == {f"eval/{n}" for n in ("results.json", "prompts.jsonl", "report.md",
                                                                  "report.html")}  # fmt: skip
    metrics = MlflowClient(tracking_uri).get_run(tracking.run_id(cfg)).data.metrics
    assert metrics["eval/pooled/tau"] == pytest.approx(results.pooled.tau)
    assert metrics["eval/macro/tau"] == pytest.approx(results.macro.tau)
    assert metrics["eval/domain_code/verify_rate"] == pytest.approx(results.domains["code"].verify_rate)
    assert "eval/mt-bench/accept_at_0" in metrics and "eval/mt-bench/cond_accept_0" in metrics
    history = MlflowClient(tracking_uri).get_metric_history(
        tracking.run_id(cfg), "eval/serving/plain_tokens_per_s"
    )
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (row["concurrency"], pytest.approx(row["fixed"][0]["tokens_per_s"])) for row in serving.rows
    ]  # a point per concurrency, as MLflow's charts plot steps

    again = evaluate(cfg, draft_loader, weights)  # unchanged config and draft: skipped
    assert again.skipped is True and to_record(again) == to_record(results)
    assert loads == [1]


def test_evaluate_defaults_to_the_trained_dflash_draft(assets_dir, tracking_uri, tmp_path):
    """What the pipeline calls, `evaluate(cfg)`: the DFlash draft in `<run_dir>/train/dflash/draft`."""
    stories = assets_dir / "models" / "stories260k"
    if not (stories / "config.json").is_file():
        pytest.skip(f"stories260k not found in {assets_dir}")
    torch.set_num_threads(1)
    overrides = stories_overrides(assets_dir, tmp_path, "eval.benchmarks=[gsm8k]", "eval.max_samples=1",
                                  "eval.max_new_tokens=6", f"tracking.uri={tracking_uri}")  # fmt: skip
    cfg = compose(overrides)
    with pytest.raises(
        DeepSpecError, match=r"no trained draft at .*train/dflash.*run `deepspec train` first"
    ):
        evaluate(cfg)

    target, _ = load_target(str(stories))
    geometry = dflash.DFlashConfig.from_target(
        target.config, num_layers=1, block_size=4, layer_ids=list(cfg.target.layer_ids), mask_token_id=0
    )
    torch.manual_seed(0)
    embed, head = target.get_input_embeddings().weight, target.get_output_embeddings().weight
    dflash.save(dflash.DFlashDraft(geometry, embed, head), run_paths(cfg).draft_dir)

    results = evaluate(cfg)
    assert results.num_draft_tokens == 3  # a block of 4 slots: the anchor and 3 drafting mask slots
    assert results.draft_file.endswith("model.safetensors")
    assert results.pooled.greedy_match == 1.0  # an untrained draft changes nothing but speed

    fewer = evaluate(compose([*overrides, "eval.num_draft_tokens=2", "eval.serving.concurrency=[]"]))
    assert not fewer.skipped and fewer.num_draft_tokens == 2 and fewer.pooled.greedy_match == 1.0
    assert len(fewer.benchmarks["gsm8k"].accept_at) == 2
    assert fewer.serving is None and "Serving" not in (run_paths(cfg).eval_dir / "report.md").read_text()


class PromptLengths(AnchorChainDrafter):
    """Records the prompt length of every generation: the context its first round sees."""

    def __init__(self, *args):
        super().__init__(*args)
        self.lengths: list[int] = []
        self._first = False

    @contextlib.contextmanager
    def decoding(self):
        self._first = True
        yield

    def draft_logits(self, context_features, anchor_token):
        if self._first:
            self.lengths.append(context_features.shape[0])
            self._first = False
        return super().draft_logits(context_features, anchor_token)


def test_multi_turn_answers_each_turn_after_the_targets_own_answers(assets_dir, tracking_uri, tmp_path):
    stories = assets_dir / "models" / "stories260k"
    if not (stories / "config.json").is_file():
        pytest.skip(f"stories260k not found in {assets_dir}")
    torch.set_num_threads(1)
    data = tmp_path / "benchmarks"
    data.mkdir()
    turns = ["Once upon a time, there was a cat", "Then the cat saw a"]
    (data / "mt-bench.jsonl").write_text(json.dumps({"turns": turns}) + "\n", encoding="utf-8")
    model, tokenizer = load_target(str(stories))
    drafter = PromptLengths(model, 3, tokenizer.bos_token_id)
    weights = stories / "model.safetensors"
    base = ["eval.benchmarks=[mt-bench]", f"eval.data_dir={data}", "eval.max_new_tokens=6",
            f"tracking.uri={tracking_uri}"]  # fmt: skip

    cfg = compose(stories_overrides(assets_dir, tmp_path / "one", *base))
    assert evaluate(cfg, lambda: drafter, weights).pooled.samples == 1  # upstream's protocol: turn 1 only
    drafter.lengths.clear()
    cfg = compose(stories_overrides(assets_dir, tmp_path / "both", *base, "eval.multi_turn=true"))
    results = evaluate(cfg, lambda: drafter, weights)
    assert results.pooled.samples == 2 and results.pooled.greedy_match == 1.0

    # turn 2's prompt: turn 1, the target's own greedy answer to it, then turn 2
    render = {"use_chat_template": False}
    first = render_prompt(tokenizer, [{"role": "user", "content": turns[0]}], **render)
    answer = target_generate(model, [0], first, max_new_tokens=6, temperature=0.0, eos_token_ids={2})
    history = [{"role": "user", "content": turns[0]},
               {"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)},
               {"role": "user", "content": turns[1]}]  # fmt: skip
    assert drafter.lengths[1:] == [len(first), len(render_prompt(tokenizer, history, **render))]
    records = [json.loads(line) for line in (tmp_path / "both" / "eval" / "dflash" / "prompts.jsonl").open()]
    assert [r["turn"] for r in records] == [0, 1] and records[0]["seed"] != records[1]["seed"]


def test_serving_metrics_take_the_best_policy_at_each_concurrency():
    served = lambda rate: {"tokens_per_s": rate, "tokens_per_request_step": 1.0, "mean_length": 0.0}  # noqa: E731
    rows = [{"concurrency": 1, "fixed": [served(50.0), served(60.0)], "scheduler": served(62.0)},
            {"concurrency": 64, "fixed": [served(640.0), served(500.0)], "scheduler": None}]  # fmt: skip
    serving = ServingFigures(256, [1], [50.0], 0.004, 200, None, None, rows)
    assert serving_metrics(serving) == {
        1: {"eval/serving/plain_tokens_per_s": 50.0, "eval/serving/best_tokens_per_s": 62.0,
            "eval/serving/scheduler_tokens_per_s": 62.0, "eval/serving/best_over_plain": 1.24},
        64: {"eval/serving/plain_tokens_per_s": 640.0, "eval/serving/best_tokens_per_s": 640.0,
             "eval/serving/best_over_plain": 1.0},
    }  # fmt: skip
    assert serving_metrics(None) == {}
    assert [ServingFigures.best(row) for row in rows] == [("scheduler", 62.0), ("plain", 640.0)]
    assert _serving_row(serving) == "best policy by concurrent requests: 1: scheduler 1.24x, 64: plain"
