"""An exported Eagle3 draft served by the CPU build of vLLM (`make vllm`) as the speculator of
SmolLM2-135M-Instruct: greedy decoding with the draft returns exactly the target's tokens, and vLLM
accepts some of the draft's tokens.

The draft is the export `eagle3.export` writes, with the default (full) vocabulary, trained for a few
AdamW steps on the target's own greedy continuations of the test prompts. Losslessness holds whatever the
draft; acceptance shows that vLLM loaded the weights and feeds the draft target features and tokens as it
was trained (a random draft gets none accepted). It is not sharp enough to catch aux layer ids off by one:
neighbouring layers' features are alike, and such a draft gets about as many tokens accepted.

The reference is the `vllm_pool` session server (the target alone); this test starts one more server,
with `--speculative-config`.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from deepspec.models.drafts.eagle3 import (
    Eagle3Config,
    Eagle3Draft,
    default_layer_ids,
    export,
    validate_export,
)
from deepspec.models.target import capture_features, load_embedding_and_head, load_target
from deepspec.tasks.vllm_server import VLLMServerError, VLLMServerPool, group_alive

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.",
    "Give me one tip for learning to cook.",
]
MAX_TOKENS = 32
SPEC_TOKENS = 3  # vLLM's num_speculative_tokens; also the draft's training-time-test steps
TRAIN_STEPS = 15


def completions(endpoint: str, model: str, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Greedy completion token ids of every prompt (sent as token ids), one request each."""
    out = []
    for ids in prompt_ids:
        body = {"model": model, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0}
        body["return_token_ids"] = True
        req = urllib.request.Request(
            f"{endpoint}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=600) as resp:
            choice = json.loads(resp.read())["choices"][0]
        assert choice["token_ids"], f"no tokens for prompt {ids}"
        out.append(choice["token_ids"])
    return out


def spec_decode_counts(endpoint: str) -> dict[str, float]:
    """vLLM's speculative-decoding counters from its Prometheus `/metrics`: drafts, draft tokens,
    accepted tokens and accepted tokens at each draft position (`accepted_pos<i>`)."""
    base = endpoint.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"vllm:spec_decode_(num_\w+?)_total(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            pos = re.search(r'position="(\d+)"', m.group(2) or "")
            name = m.group(1) if pos is None else f"accepted_pos{pos.group(1)}"
            counts[name] = counts.get(name, 0.0) + float(m.group(3))
    return counts


def trained_draft(hf_dir: str, prompts: list[list[int]], continuations: list[list[int]]) -> Eagle3Draft:
    """An Eagle3 draft of the target, trained on prompt + continuation sequences (the loss on the
    continuation) with features captured from the target, all in one right-padded batch."""
    torch.manual_seed(0)
    model, _ = load_target(hf_dir)
    embed, head = load_embedding_and_head(hf_dir)
    layer_ids = default_layer_ids(model.config.num_hidden_layers)
    cfg = Eagle3Config.from_target(model.config, layer_ids=layer_ids, ttt_steps=SPEC_TOKENS)
    draft = Eagle3Draft(cfg, embed, head)
    sequences = [p + c for p, c in zip(prompts, continuations, strict=True)]
    length = max(map(len, sequences))
    pad = model.config.pad_token_id or 0
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    loss_mask = torch.zeros_like(ids)
    for b, (seq, prompt) in enumerate(zip(sequences, prompts, strict=True)):
        ids[b, : len(seq)] = torch.tensor(seq)
        loss_mask[b, len(prompt) : len(seq)] = 1
    # right padding under causal attention: real positions never see the padding
    features = capture_features(model, ids, layer_ids)
    del model
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    for _ in range(TRAIN_STEPS):
        loss, _ = draft.forward_train(features, ids, loss_mask)  # teacher: the greedy tokens themselves
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draft.eval()


def test_eagle3_export_is_lossless_and_accepted_in_vllm(vllm_pool, vllm_python, smollm2_hf_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    prompt_ids = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for p in PROMPTS
    ]
    model_name = vllm_pool.served_model_name
    reference = completions(vllm_pool.endpoints[0], model_name, prompt_ids)

    draft = trained_draft(smollm2_hf_dir, prompt_ids, reference)
    exported = tmp_path / "eagle3"
    export(draft, exported, AutoConfig.from_pretrained(smollm2_hf_dir))
    assert validate_export(exported) == []

    spec = {"method": "eagle3", "model": str(exported), "num_speculative_tokens": SPEC_TOKENS}
    pool = VLLMServerPool(
        model=smollm2_hf_dir,
        python=vllm_python,
        dtype="float32",
        max_model_len=2048,
        seed=0,
        extra_args=["--speculative-config", json.dumps(spec)],
        log_dir=tmp_path / "vllm",
        startup_timeout_s=900,
    )
    try:
        pool.start()  # on a failure it has stopped its server already
    except VLLMServerError as err:  # the root cause sits above the log tail the error quotes
        log = (tmp_path / "vllm" / "vllm-0.log").read_text(errors="replace").splitlines()
        messages = {line.split("] ", 1)[-1] for line in log}
        causes = sorted(m for m in messages if re.match(r"\w+(Error|Exception): ", m))
        pytest.fail(f"vLLM did not serve the Eagle3 export {exported}:\n" + "\n".join(causes) + f"\n\n{err}")
    groups = [g for g in pool.pids if g]
    try:
        speculated = completions(pool.endpoints[0], model_name, prompt_ids)
        counts = spec_decode_counts(pool.endpoints[0])
    finally:
        pool.close()
    assert not any(group_alive(g) for g in groups), f"vLLM processes left after close(): groups {groups}"

    for prompt, ref, got in zip(PROMPTS, reference, speculated, strict=True):
        assert got == ref, (
            f"{prompt!r}: with the Eagle3 draft vLLM returned {tokenizer.decode(got)!r}, "
            f"the target alone {tokenizer.decode(ref)!r}"
        )
    drafted, accepted = counts.get("num_draft_tokens", 0.0), counts.get("num_accepted_tokens", 0.0)
    per_pos = [counts.get(f"accepted_pos{i}", 0.0) for i in range(SPEC_TOKENS)]
    print(f"vLLM Eagle3: {accepted:.0f} of {drafted:.0f} draft tokens accepted; per position {per_pos}")
    assert counts.get("num_drafts", 0.0) > 0 and drafted > 0, f"vLLM drafted nothing: {counts}"
    assert accepted > 0, f"vLLM accepted none of {drafted:.0f} draft tokens: {counts}"
