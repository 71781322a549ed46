"""DeepSpec's DSpark export against vLLM's own DSpark code (`model_executor/models/qwen3_dspark.py`, its
config checks and its DSpark speculator), in the CPU build of vLLM 0.32 (`make vllm`), for untrained
DSpark drafts of SmolLM2-135M-Instruct (1 layer, a block of 4, Markov rank 8, a confidence head).

vLLM's CPU build cannot serve `method: dspark`: the V1 model runner refuses it ("Model Runner V1 does not
support: dspark speculative decoding") and the V2 runner needs Triton and a GPU. So a subprocess of the
vLLM virtualenv runs vLLM's code as far as the CPU allows, and the tests compare its findings with DeepSpec:

Verified, with vLLM's code:
- config: `EngineArgs(..., speculative_config={"method": "dspark", "model": export}).create_engine_config()`
  parses the export and fails only on the V1 runner's refusal. With that one item dropped from the runner
  check (patched to record what it refuses), the engine config builds: method `dspark`, architecture
  `Qwen3DSparkModel`, num_speculative_tokens defaulting to the block size, the target layers it captures
  (`target_layer_ids` + 1, as for DFlash), the mask token, non-causal draft attention, sample_from_anchor.
- weights: `Qwen3DSparkForCausalLM` built under that config on CPU, its parameters set to NaN, then its
  own `load_weights` on the export's tensors: every export tensor feeds a parameter, every parameter but
  vLLM's unused `mask_embedding` placeholder is loaded, each equal to the export's tensor (q/k/v and
  gate/up stacked as vLLM fuses them); the embedding and LM head are the export's (the target's).
- the heads and the slot convention: vLLM's `DSparkSpeculator._sample_sequential` (its left-to-right Markov
  sampling, greedy) on the backbone states DeepSpec computes for a block, with the buffers vLLM's
  prepare-inputs kernel fills with sample_from_anchor (query i is slot i, the anchor then mask tokens;
  sample i reads query i and drafts token p + i + 1; the Markov head is fed the anchor first): it drafts
  DeepSpec's `propose` chain, with DeepSpec's confidences.
- gated and RNN Markov heads: vLLM's `load_weights` refuses their weights, and so does `validate_export`.

Not verified (needs the V2 GPU runner): vLLM's backbone forward (its DFlash-Qwen3 attention over the
context K/V and the block; DeepSpec's backbone is DFlash's, whose own export vLLM serves in
`test_vllm_exports.py`), the Triton prepare-inputs kernel itself (its layout is read from the source),
serving, acceptance and losslessness, and a markov_rank=0 export (vLLM builds a zero-width Markov head
that its loader accepts but the CPU weight post-processing dies on).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from deepspec.models.drafts import dspark
from deepspec.models.drafts.spec import DraftInputs
from deepspec.models.target import load_embedding_and_head, mask_token_id

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LAYER_IDS = [1, 14, 27]  # conf/target/smollm2_135m.yaml
BLOCK, RANK = 4, 8
V1_REFUSAL = "dspark speculative decoding"
HEADS = ("vanilla", "gated", "rnn")

# Runs in the vLLM virtualenv: argv[1] is {"target", "drafts": {name: dir}, "chain": .pt, "out", "port"}.
VLLM_CHECK = r'''
import json
import sys

import torch
from safetensors.torch import load_file
from vllm.config import VllmConfig, replace, set_current_vllm_config
from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.model_loader.utils import process_weights_after_loading
from vllm.model_executor.models.qwen3_dflash import dflash_has_any_non_causal
from vllm.model_executor.models.qwen3_dspark import Qwen3DSparkForCausalLM
from vllm.v1.worker.gpu.spec_decode.dspark.speculator import DSparkSpeculator
from vllm.v1.worker.gpu.spec_decode.eagle.eagle3_utils import get_eagle3_aux_layers_from_config
from vllm.v1.worker.gpu.spec_decode.utils import get_parallel_drafting_token_id

args = json.loads(sys.argv[1])
V1_REFUSAL = "dspark speculative decoding"
refusals = []
v1_check = VllmConfig._get_v1_model_runner_unsupported_features


def without_dspark_refusal(self):
    found = v1_check(self)
    refusals.append(list(found))
    return [f for f in found if f != V1_REFUSAL]


def engine_config(draft_dir, patched):
    VllmConfig._get_v1_model_runner_unsupported_features = without_dspark_refusal if patched else v1_check
    speculative = {"method": "dspark", "model": draft_dir}  # num_speculative_tokens: vLLM's default
    engine = EngineArgs(
        model=args["target"], dtype="float32", max_model_len=512, enforce_eager=True,
        speculative_config=speculative,
    )
    return engine.create_engine_config()


FUSED = {".qkv_proj.": ("q_proj", "k_proj", "v_proj"), ".gate_up_proj.": ("gate_proj", "up_proj")}


def export_names(param):
    """The export tensors a vLLM parameter is loaded from, in its order (q/k/v and gate/up fused)."""
    name = param.removeprefix("model.")
    for fused, parts in FUSED.items():
        if fused in name:
            return [name.replace(fused.strip("."), p) for p in parts]
    return [name]


def sequential_sample(model, hidden, anchor, mask_id):
    """vLLM's `DSparkSpeculator._sample_sequential` for one request, greedy, on the buffers its Triton
    prepare-inputs kernel fills with sample_from_anchor: the queries are the anchor then mask tokens,
    sample i reads query i and predicts position query_pos + 1."""
    n = hidden.shape[0]
    spec = object.__new__(DSparkSpeculator)
    spec.model, spec.num_speculative_steps, spec._draft_topk = model, n, None
    spec.sample_indices = torch.arange(n)
    spec.sample_idx_mapping = torch.zeros(n, dtype=torch.int32)
    spec.sample_pos = torch.arange(n) + 1
    spec.input_buffers = type("InputBuffers", (), {})()
    spec.input_buffers.input_ids = torch.tensor([anchor] + [mask_id] * (n - 1))
    spec._anchor_idx = torch.zeros(1, dtype=torch.int64)
    spec._step_cols = torch.arange(n, dtype=torch.int32)
    spec.acceptance_estimator, spec.draft_logits = None, None
    spec.draft_tokens = torch.zeros(1, n, dtype=torch.int64)
    spec.use_confidence_head = model.model.confidence_head is not None
    spec.draft_token_confidence_probs = torch.zeros(1, n)
    spec._sample_sequential(1, hidden)
    return spec.draft_tokens[0].tolist(), spec.draft_token_confidence_probs[0].tolist()


results = {}
for name, draft_dir in args["drafts"].items():
    r = results[name] = {}
    try:
        engine_config(draft_dir, patched=False)
        r["unpatched_error"] = None
    except Exception as err:
        r["unpatched_error"] = str(err)
    refusals.clear()
    config = engine_config(draft_dir, patched=True)
    r["refusals"] = refusals[-1]
    speculative = config.speculative_config
    hf = speculative.draft_model_config.hf_config
    r["method"], r["num_speculative_tokens"] = speculative.method, speculative.num_speculative_tokens
    r["architectures"] = list(speculative.draft_model_config.architectures)
    r["sample_from_anchor"] = getattr(hf, "sample_from_anchor", True)  # DSparkSpeculator's default
    r["aux_layers"] = list(get_eagle3_aux_layers_from_config(speculative))
    r["mask_token_id"] = get_parallel_drafting_token_id(hf)
    r["non_causal"] = dflash_has_any_non_causal(hf)
    # as vLLM's load_dspark_model configures the draft
    draft_config = replace(
        config, attention_config=replace(config.attention_config, use_non_causal=r["non_causal"])
    )
    with set_current_vllm_config(draft_config):
        if not results.get("_distributed"):
            init_distributed_environment(
                world_size=1, rank=0, local_rank=0, backend="gloo",
                distributed_init_method=f"tcp://127.0.0.1:{args['port']}",
            )
            ensure_model_parallel_initialized(1, 1)
            results["_distributed"] = True
        model = Qwen3DSparkForCausalLM(vllm_config=draft_config)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        export = load_file(f"{draft_dir}/model.safetensors")
        try:
            model.load_weights(export.items())
        except ValueError as err:
            r["load_error"] = str(err)
            continue
        r["load_error"] = None
        params = {n: p.detach() for n, p in model.named_parameters()}
        r["not_loaded"] = sorted(n for n, p in params.items() if p.isnan().any())
        loaded = [n for n in params if n not in r["not_loaded"]]
        sources = {n: export_names(n) for n in loaded}
        r["unused"] = sorted(set(export) - {s for names in sources.values() for s in names})
        r["differ"] = sorted(
            n for n, names in sources.items()
            if not all(s in export for s in names)
            or not torch.equal(params[n], torch.cat([export[s] for s in names]).to(params[n].dtype))
        )
        if name == "vanilla":
            # as vLLM's loader does after load_weights (on CPU it picks the GEMM kernels)
            process_weights_after_loading(model, speculative.draft_model_config, torch.device("cpu"))
            chain = torch.load(args["chain"])
            with torch.no_grad():
                tokens, confidence = sequential_sample(
                    model, chain["hidden"], int(chain["anchor"]), r["mask_token_id"]
                )
            r["chain"] = {"tokens": tokens, "confidence": confidence}
            # the same block fed another previous token first: what a shifted convention would draft
            with torch.no_grad():
                r["chain_other_anchor"] = sequential_sample(
                    model, chain["hidden"], int(chain["anchor"]) + 1, r["mask_token_id"]
                )[0]
results.pop("_distributed", None)
with open(args["out"], "w") as f:
    json.dump(results, f)
'''


@dataclass
class Checked:
    exports: dict[str, Path]
    vllm: dict[str, dict]  # the subprocess's findings, by Markov head
    chain: dspark.DSparkProposal  # DeepSpec's greedy proposal for the block vLLM samples
    base_chain: list[int]  # the block's argmax tokens without the Markov head


def smollm2_dspark(hf_dir: str, embed: torch.Tensor, head: torch.Tensor, kind: str) -> dspark.DSparkDraft:
    settings = dspark.DSparkSettings(
        name="dspark", block_size=BLOCK, num_layers=1, loss_decay=4.0, anchors_per_sequence=8,
        markov_rank=RANK, markov_head_type=kind, confidence_head=True, confidence_head_with_markov=True,
        ce_weight=0.1, l1_weight=0.9, confidence_weight=1.0,
    )  # fmt: skip
    torch.manual_seed(0)
    mask = mask_token_id(AutoTokenizer.from_pretrained(hf_dir))
    draft = dspark.SPEC.build(
        settings, DraftInputs(AutoConfig.from_pretrained(hf_dir), LAYER_IDS, mask, embed, head)
    )
    # the heads start near zero (std 0.02): a Markov bias larger than the base logits makes each slot's
    # token follow from the token before it, so the chain shows which token vLLM feeds the head
    with torch.no_grad():
        draft.markov_head.markov_w1.weight.normal_(std=1.0)
        draft.markov_head.markov_w2.weight.normal_(std=20.0)
        draft.confidence_head.proj.weight.normal_(std=0.05)
    return draft.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checked(vllm_python, smollm2_hf_dir, tmp_path_factory) -> Checked:
    root = tmp_path_factory.mktemp("dspark-vllm")
    embed, head = load_embedding_and_head(smollm2_hf_dir)
    target_config = AutoConfig.from_pretrained(smollm2_hf_dir)
    exports, drafts = {}, {}
    for kind in HEADS:
        drafts[kind] = smollm2_dspark(smollm2_hf_dir, embed, head, kind)
        exports[kind] = root / kind
        assert dspark.export(drafts[kind], exports[kind], target_config) == "Qwen3DSparkModel"
    draft, anchor = drafts["vanilla"], 1234
    features = torch.randn(
        6, len(LAYER_IDS) * target_config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    hidden = draft._block_hidden(features, anchor).detach().contiguous()
    torch.save({"hidden": hidden, "anchor": torch.tensor(anchor)}, root / "chain.pt")
    spec = {
        "target": smollm2_hf_dir,
        "drafts": {k: str(v) for k, v in exports.items()},
        "chain": str(root / "chain.pt"),
        "out": str(root / "vllm.json"),
        "port": free_port(),
    }
    done = subprocess.run(
        [vllm_python, "-c", VLLM_CHECK, json.dumps(spec)],
        cwd=root, capture_output=True, text=True, timeout=900,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
    )  # fmt: skip
    assert done.returncode == 0, f"vLLM's check failed:\n{done.stderr[-6000:]}"
    with torch.no_grad():
        base_chain = draft.backbone.lm_head(hidden).argmax(-1).tolist()
    return Checked(
        exports, json.loads((root / "vllm.json").read_text()), draft.propose(features, anchor), base_chain
    )


def test_vllm_reads_the_export_and_refuses_it_only_for_the_v1_runner(checked):
    for kind in HEADS:
        found = checked.vllm[kind]
        # the refusal vLLM raises, and nothing else in the runner check
        assert f"Model Runner V1 does not support: {V1_REFUSAL} [" in found["unpatched_error"], found
        assert found["refusals"] == [V1_REFUSAL]
        assert found["method"] == "dspark" and found["architectures"] == ["Qwen3DSparkModel"]
        assert found["num_speculative_tokens"] == BLOCK  # vLLM's default: the block size, all slots drafting
        assert found["aux_layers"] == [i + 1 for i in LAYER_IDS]  # hidden state i + 1: layer i's output
        assert (
            found["mask_token_id"]
            == json.loads((checked.exports[kind] / "config.json").read_text())["mask_token_id"]
        )
        assert found["non_causal"] is True  # the block attends both ways, as DeepSpec trains it
        assert found["sample_from_anchor"] is True


def test_every_export_tensor_loads_into_vllms_qwen3_dspark_model(checked):
    found = checked.vllm["vanilla"]
    assert found["load_error"] is None
    assert found["not_loaded"] == ["model.mask_embedding"]  # vLLM's placeholder, unused for DSpark
    assert found["unused"] == [] and found["differ"] == []
    assert dspark.validate_export(checked.exports["vanilla"]) == []


def test_vllms_sequential_sampling_drafts_deepspecs_chain(checked):
    """vLLM's Markov sampling loop on DeepSpec's backbone states: the anchor is the first previous token
    and slot k's token feeds slot k + 1, as DeepSpec drafts; its confidences are DeepSpec's c_k."""
    chain = checked.vllm["vanilla"]["chain"]
    assert checked.chain.tokens != checked.base_chain  # the Markov head decides the chain
    assert chain["tokens"] == checked.chain.tokens
    assert checked.vllm["vanilla"]["chain_other_anchor"] != chain["tokens"]  # the comparison is sharp
    torch.testing.assert_close(
        torch.tensor(chain["confidence"]), checked.chain.confidence, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("kind", ["gated", "rnn"])
def test_vllm_refuses_the_markov_heads_it_lacks_as_validate_export_does(checked, kind):
    found = checked.vllm[kind]
    assert found["load_error"] and "markov_head" in found["load_error"], found
    problems = dspark.validate_export(checked.exports[kind])
    assert len(problems) == 1 and problems[0].startswith(f"config.json: markov_head_type={kind!r}: vLLM's")
