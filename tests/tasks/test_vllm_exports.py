"""Exports served by the CPU build of vLLM (`make vllm`) as the speculator of SmolLM2-135M-Instruct, with
the acceptance DeepSpec measures.

For DFlash and Eagle3: a draft is trained on the target's own greedy continuations of the test prompts
until DeepSpec's evaluator (`speculative_generate`) gives tau >= 1.5 on them, exported, and served. At
temperature 0 vLLM must return the target-alone server's tokens, and its acceptance from `/metrics`
(mean acceptance length and the rate at each draft position) must be within 0.1 tokens or 5% (whichever
is larger) of DeepSpec's on the same prompts with the same number of draft tokens. Each test prints both
side by side. The DFlash test also checks the comparison is sharp: DeepSpec reading the draft's slots
shifted by one (the convention upstream DeepSpec's DFlash trains in) measures an acceptance vLLM does not
reproduce, and that served with 2 speculative tokens (a shorter block) it accepts what DeepSpec measures
with `set_num_draft_tokens(draft, 2)`.

DSpark cannot be served here: the CPU build refuses `method: dspark` ("Model Runner V1 does not support
dspark speculative decoding"; its V2 runner needs Triton and a GPU). Its export is checked against
vLLM's own `qwen3_dspark` model code instead: the config vLLM parses, the weights its `load_weights`
maps and its Markov sampling loop, in `test_vllm_dspark_export.py`.

The reference is the `vllm_pool` session server (the target alone); each serving test starts one more
server, with `--speculative-config`.
"""

from __future__ import annotations

import json
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from deepspec.models.drafts import dflash, draft_spec, eagle3, set_num_draft_tokens
from deepspec.models.drafts.spec import DraftInputs
from deepspec.models.speculative import acceptance_stats, speculative_generate
from deepspec.models.target import capture_features, load_target, mask_token_id
from deepspec.tasks.vllm_server import VLLMServerError, VLLMServerPool, group_alive

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = [
    "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.",
    "Give me one tip for learning to cook.",
    "Why is the sky blue? Answer briefly.",
]
# Every generation runs to MAX_TOKENS, past the end of the turn (`ignore_eos`): both sides then count the
# same rounds, where an end-of-turn token would end DeepSpec's last round as upstream counts it.
MAX_TOKENS = 32
LAYER_IDS = [1, 14, 27]  # conf/target/smollm2_135m.yaml
MIN_TAU = 1.5
# Train until tau >= MIN_TAU, measured after each round of training steps. A DFlash draft of SmolLM2 sits
# at the data's unigram loss for its first ~200 steps (its frozen, tied head), then learns the
# continuations; Eagle3 learns them in a few dozen steps, and is measured early so that its acceptance is
# not all ones.
TRAIN_ROUNDS = 5


@dataclass
class Acceptance:
    """Mean acceptance length (tau: tokens per verify step, the target's own included) and the share of
    verify steps that kept the draft at each position."""

    tau: float
    per_position: list[float]

    def __str__(self) -> str:
        return f"tau {self.tau:.3f}, per position [{' '.join(f'{a:.3f}' for a in self.per_position)}]"


def assert_agrees(served: Acceptance, measured: Acceptance) -> None:
    """vLLM's acceptance equals DeepSpec's within 0.1 tokens or 5%, whichever is larger."""
    assert len(served.per_position) == len(measured.per_position), (served, measured)
    for name, a, b in [
        ("tau", served.tau, measured.tau),
        *[
            (f"position {k + 1}", a, b)
            for k, (a, b) in enumerate(zip(served.per_position, measured.per_position, strict=True))
        ],
    ]:
        assert abs(a - b) <= max(0.1, 0.05 * abs(b)), f"{name}: vLLM {a:.3f}, DeepSpec {b:.3f}"


def completions(endpoint: str, model: str, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Greedy completion token ids of every prompt (sent as token ids), one request each."""
    out = []
    for ids in prompt_ids:
        body = {
            "model": model,
            "prompt": ids,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        req = urllib.request.Request(
            f"{endpoint}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=600) as resp:
            choice = json.loads(resp.read())["choices"][0]
        assert choice["token_ids"], f"no tokens for prompt {ids}"
        out.append(choice["token_ids"])
    return out


def served_acceptance(endpoint: str, num_draft_tokens: int) -> Acceptance:
    """vLLM's speculative-decoding counters from its Prometheus `/metrics`: drafts (verify steps with a
    draft), accepted tokens, and accepted tokens at each draft position."""
    with urllib.request.urlopen(f"{endpoint.removesuffix('/v1')}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"vllm:spec_decode_(num_\w+?)_total(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            pos = re.search(r'position="(\d+)"', m.group(2) or "")
            name = m.group(1) if pos is None else f"accepted_pos{pos.group(1)}"
            counts[name] = counts.get(name, 0.0) + float(m.group(3))
    drafts = counts.get("num_drafts", 0.0)
    assert drafts > 0 and counts.get("num_draft_tokens", 0.0) > 0, f"vLLM drafted nothing: {counts}"
    return Acceptance(
        tau=1 + counts.get("num_accepted_tokens", 0.0) / drafts,
        per_position=[counts.get(f"accepted_pos{k}", 0.0) / drafts for k in range(num_draft_tokens)],
    )


class Target:
    """SmolLM2 in fp32 as DeepSpec runs it, the test prompts, and vLLM's greedy continuations of them."""

    def __init__(self, hf_dir: str, vllm_pool):
        self.hf_dir = hf_dir
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.prompts = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            for p in PROMPTS
        ]
        self.served_name = vllm_pool.served_model_name
        self.reference = completions(vllm_pool.endpoints[0], self.served_name, self.prompts)
        self.model, _ = load_target(hf_dir)
        self.config = AutoConfig.from_pretrained(hf_dir)

    def samples(self) -> list[dict]:
        """Prompt + continuation of every prompt with the target's features, the continuation supervised."""
        out = []
        for prompt, continuation in zip(self.prompts, self.reference, strict=True):
            ids = torch.tensor(prompt + continuation)
            features = capture_features(self.model, ids[None], LAYER_IDS)[0]
            loss_mask = torch.zeros_like(ids)
            loss_mask[len(prompt) :] = 1
            out.append({"input_ids": ids, "loss_mask": loss_mask, "features": features})
        return out

    def measured(self, drafter) -> tuple[Acceptance, list[list[int]]]:
        """DeepSpec's acceptance for `drafter` on the prompts at temperature 0, and the tokens it decoded."""
        results = [
            speculative_generate(
                self.model,
                LAYER_IDS,
                drafter,
                ids,
                max_new_tokens=MAX_TOKENS,
                temperature=0.0,
                eos_token_ids=set(),
            )
            for ids in self.prompts
        ]
        stats = acceptance_stats(results)
        return Acceptance(stats["tau"], stats["acceptance"]), [r.tokens for r in results]


@pytest.fixture
def report(capsys):
    """Print past pytest's capture, so that `make test` shows vLLM's and DeepSpec's figures side by side."""

    def emit(text: str) -> None:
        with capsys.disabled():
            print(text)

    return emit


@pytest.fixture(scope="module")
def target(smollm2_hf_dir, vllm_pool, one_thread) -> Target:
    return Target(smollm2_hf_dir, vllm_pool)


def train_until_accepted(
    target: Target, algo: str, settings, step, steps_per_round: int, report
) -> tuple[torch.nn.Module, Acceptance]:
    """Build the `algo` draft of the target and train it with `step(draft, samples)` (the loss of one
    full batch) until DeepSpec measures tau >= MIN_TAU on the prompts."""
    torch.manual_seed(0)
    samples = target.samples()
    embed = target.model.get_input_embeddings().weight.detach()
    head = target.model.get_output_embeddings().weight.detach()
    continuations = torch.cat([s["input_ids"][s["loss_mask"].bool()] for s in samples])
    inputs = DraftInputs(
        target.config, LAYER_IDS, mask_token_id(target.tokenizer), embed, head,
        token_counts=lambda: torch.bincount(continuations, minlength=embed.shape[0]),
    )  # fmt: skip
    draft = draft_spec(algo).build(settings, inputs)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    measured = None
    for round_ in range(1, TRAIN_ROUNDS + 1):
        draft.train()
        for _ in range(steps_per_round):
            optimizer.zero_grad()
            loss = step(draft, samples)
            loss.backward()
            optimizer.step()
        measured, _ = target.measured(draft.eval())
        report(f"{algo}: {round_ * steps_per_round} steps, loss {loss.item():.3f}, DeepSpec {measured}")
        if measured.tau >= MIN_TAU:
            return draft, measured
    pytest.fail(
        f"{algo}: after {TRAIN_ROUNDS * steps_per_round} steps DeepSpec measures {measured} (< {MIN_TAU})"
    )


def serve(target: Target, method: str, export_dir: Path, num_draft_tokens: int, log_dir: Path):
    """A vLLM server of the target with the export as its speculator (started; the caller closes it)."""
    spec = {"method": method, "model": str(export_dir), "num_speculative_tokens": num_draft_tokens}
    pool = VLLMServerPool(
        model=target.hf_dir,
        dtype="float32",
        max_model_len=2048,
        seed=0,
        extra_args=["--speculative-config", json.dumps(spec)],
        log_dir=log_dir,
        startup_timeout_s=900,
    )
    try:
        pool.start()  # on a failure it has stopped its server already
    except VLLMServerError as err:  # the root cause sits above the log tail the error quotes
        log = (log_dir / "vllm-0.log").read_text(errors="replace").splitlines()
        causes = sorted(
            {m for m in (line.split("] ", 1)[-1] for line in log) if re.match(r"\w+(Error|Exception): ", m)}
        )
        pytest.fail(
            f"vLLM did not serve the {method} export {export_dir}:\n" + "\n".join(causes) + f"\n\n{err}"
        )
    return pool


def served_and_measured(
    target: Target, method: str, draft, export, tmp_path: Path, report
) -> tuple[Acceptance, Acceptance]:
    """Export `draft`, serve it, and return vLLM's acceptance beside DeepSpec's, after checking that both
    decode exactly the target-alone server's tokens."""
    export_dir = tmp_path / method
    export(draft, export_dir, target.config)
    assert draft_spec(method).validate_export(export_dir) == []
    measured, ours = target.measured(draft.eval())
    pool = serve(target, method, export_dir, draft.num_draft_tokens, tmp_path / "vllm")
    groups = [g for g in pool.pids if g]
    try:
        speculated = completions(pool.endpoints[0], target.served_name, target.prompts)
        served = served_acceptance(pool.endpoints[0], draft.num_draft_tokens)
    finally:
        pool.close()
    assert not any(group_alive(g) for g in groups), f"vLLM processes left after close(): groups {groups}"
    for prompt, ref, got, mine in zip(PROMPTS, target.reference, speculated, ours, strict=True):
        decode = target.tokenizer.decode
        assert got == ref, (
            f"{prompt!r}: with the {method} draft vLLM returned {decode(got)!r}, alone {decode(ref)!r}"
        )
        assert mine == ref, f"{prompt!r}: DeepSpec decoded {decode(mine)!r}, vLLM alone {decode(ref)!r}"
    report(
        f"\n{method}, {draft.num_draft_tokens} draft tokens a verify step:"
        f"\n  vLLM     {served}\n  DeepSpec {measured}"
    )
    return served, measured


class ShiftedDFlash:
    """The DFlash draft read in upstream DeepSpec's slot convention: draft j from slot j - 1 (the anchor
    slot included) instead of mask slot j."""

    def __init__(self, draft: dflash.DFlashDraft):
        self.draft, self.num_draft_tokens = draft, draft.num_draft_tokens

    def draft_logits(self, context_features: torch.Tensor, anchor_token: int) -> torch.Tensor:
        return self.draft.block_logits(context_features, anchor_token)[:-1]


def test_dflash_export_is_served_with_the_acceptance_deepspec_measures(target, tmp_path, report):
    settings = dflash.DFlashSettings(
        name="dflash", block_size=4, num_layers=1, loss_decay=4.0, anchors_per_sequence=64
    )
    generator = torch.Generator().manual_seed(0)

    def step(draft, samples):
        return dflash.training_loss(draft, draft, samples, settings, None, generator)[0]

    draft, _ = train_until_accepted(target, "dflash", settings, step, steps_per_round=120, report=report)
    served, measured = served_and_measured(target, "dflash", draft, dflash.export, tmp_path, report)
    assert_agrees(served, measured)

    shifted, _ = target.measured(ShiftedDFlash(draft))
    report(f"  DeepSpec reading the slots shifted by one: {shifted}")
    with pytest.raises(AssertionError):
        assert_agrees(served, shifted)

    # fewer speculative tokens than the block drafts: vLLM then runs the block [anchor, 2 masks], and so
    # does DeepSpec's eval.num_draft_tokens=2 (`set_num_draft_tokens`)
    set_num_draft_tokens(draft, 2)
    served, measured = served_and_measured(target, "dflash", draft, dflash.export, tmp_path / "two", report)
    assert_agrees(served, measured)


def test_eagle3_export_is_served_with_the_acceptance_deepspec_measures(target, tmp_path, report):
    # a reduced vocabulary (the 1,024 tokens the continuations use most, d2t in the export) keeps training
    # cheap on CPU, and has vLLM map draft ids back to the target's
    settings = eagle3.Eagle3Settings(name="eagle3", ttt_steps=3, step_decay=0.8, draft_vocab_size=1024)

    def step(draft, samples):  # right-padded; teacher: the greedy tokens themselves
        n = max(s["input_ids"].shape[0] for s in samples)
        ids = torch.zeros(len(samples), n, dtype=torch.long)
        mask = torch.zeros(len(samples), n, dtype=torch.long)
        features = torch.zeros(len(samples), n, samples[0]["features"].shape[1])
        for b, s in enumerate(samples):
            length = s["input_ids"].shape[0]
            ids[b, :length], mask[b, :length], features[b, :length] = (
                s["input_ids"],
                s["loss_mask"],
                s["features"],
            )
        return draft.forward_train(features, ids, mask)[0]

    draft, _ = train_until_accepted(target, "eagle3", settings, step, steps_per_round=15, report=report)
    served, measured = served_and_measured(target, "eagle3", draft, eagle3.export, tmp_path, report)
    assert_agrees(served, measured)
