"""Target model loading and feature capture.

Every loader takes a hub id or a local directory (optionally a GGUF file inside it). A GGUF target is
dequantized once and saved as a plain transformers checkpoint beside the file, because converting it
takes far longer than loading the result.

Features are the residual stream after chosen decoder layers: HF's `hidden_states[i + 1]` is the output
of layer `i` (entry 0 is the embedding output).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.cache_utils import DynamicCache

from deepspec.models.attention import PACKED_GQA_SDPA
from deepspec.models.cpu_products import multiply_rows_first
from deepspec.models.errors import ConfigError

log = logging.getLogger(__name__)
# We pass `past_key_values` on purpose (pyproject pins transformers below 5.40, which drops it).
warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"target.dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def _converted_dir(path: str, gguf_file: str) -> Path:
    return Path(path) / f".{Path(gguf_file).stem}.hf"


def resolve_source(path: str, gguf_file: str | None) -> str:
    """Where transformers should load from: the converted copy of a GGUF file, converting it first."""
    if gguf_file is None:
        return path
    gguf_path = Path(path) / gguf_file
    if not gguf_path.is_file():
        raise ConfigError(
            f"target.gguf_file: {gguf_path} does not exist (for the demo target run `make assets`)"
        )
    out = _converted_dir(path, gguf_file)
    if not (out / "config.json").is_file():
        log.info("dequantizing %s once into %s", gguf_path, out)
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
        # The weights are already dequantized; drop the GGUF marker so the result saves as plain float.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    return str(out)


def load_tokenizer(path: str, gguf_file: str | None = None, revision: str | None = None):
    return AutoTokenizer.from_pretrained(resolve_source(path, gguf_file), revision=revision)


def load_target(
    path: str, gguf_file: str | None = None, revision: str | None = None, dtype: str = "float32"
) -> tuple[PreTrainedModel, object]:
    """Load a frozen target model and its tokenizer from a hub id or a local directory."""
    source = resolve_source(path, gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=resolve_dtype(dtype))
    except OSError as err:
        raise ConfigError(f"target.path={path!r}: cannot load a model from it ({err})") from err
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    model.eval().requires_grad_(False)
    fold_query_heads(model)
    multiply_rows_first(model)  # products of 1..3 rows (decoding, verifying) on a CPU: models/cpu_products.py
    return model, tokenizer


def fold_query_heads(model: PreTrainedModel) -> None:
    """Give a target on transformers' `sdpa` the folded grouped-query attention (`models.attention`), so
    that its verify forwards read the cache's key heads as stored; other attentions are left as they are."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(PACKED_GQA_SDPA)


def check_layer_ids(layer_ids: list[int], num_layers: int) -> list[int]:
    bad = [i for i in layer_ids if not 0 <= i < num_layers]
    if not layer_ids or bad:
        raise ConfigError(
            f"target.layer_ids={list(layer_ids)}: need at least one id, each in [0, {num_layers - 1}]"
        )
    return list(layer_ids)


def input_embeddings(model: PreTrainedModel) -> nn.Embedding:
    return model.get_input_embeddings()


def output_head(model: PreTrainedModel) -> nn.Linear:
    return model.get_output_embeddings()


def load_embedding_and_head(
    path: str, gguf_file: str | None = None, revision: str | None = None, dtype: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's input embedding and LM head weights, without keeping the rest of the model.

    A safetensors checkpoint is read tensor by tensor; anything else is loaded whole, then dropped.
    """
    source = resolve_source(path, gguf_file)
    local = Path(source)
    files = sorted(local.glob("*.safetensors")) if local.is_dir() else []
    if files:
        from safetensors import safe_open

        config = AutoConfig.from_pretrained(source)
        tensors: dict[str, torch.Tensor] = {}
        wanted = ("embed_tokens.weight", "lm_head.weight")
        for file in files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    if key.endswith(wanted):
                        tensors[key.rsplit(".", 2)[-2]] = f.get_tensor(key)
        if "embed_tokens" in tensors:
            emb = tensors["embed_tokens"]
            head = emb if getattr(config, "tie_word_embeddings", False) else tensors.get("lm_head")
            if head is not None:
                return emb.to(resolve_dtype(dtype)), head.to(resolve_dtype(dtype))
    model, _ = load_target(path, gguf_file, revision, dtype)
    return input_embeddings(model).weight.detach().clone(), output_head(model).weight.detach().clone()


def fingerprint(tokenizer) -> dict[str, str]:
    """Hashes that tell whether a cache or draft was built with the same tokenizer and chat template."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    template = (tokenizer.chat_template or "").encode()
    return {
        "tokenizer_sha256": hashlib.sha256(vocab).hexdigest()[:16],
        "chat_template_sha256": hashlib.sha256(template).hexdigest()[:16],
    }


def mask_token_id(tokenizer, configured: int | None = None) -> int:
    """The token id a draft fills its block with: `configured` (target.mask_token_id), or the
    tokenizer's pad, unk or eos token."""
    if configured is not None:
        return int(configured)
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ConfigError("target.mask_token_id: the tokenizer has no pad/unk/eos token; set it explicitly")


@torch.no_grad()
def capture_features(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    layer_ids: list[int],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Residual stream after each layer in `layer_ids`, concatenated: [batch, seq, n_layers * hidden]."""
    return _forward(model, input_ids, layer_ids, attention_mask)[0]


def _forward(model, input_ids, layer_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The captured features and the final normalised hidden state of one forward."""
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return torch.cat([out.hidden_states[i + 1] for i in layer_ids], dim=-1), out.last_hidden_state


def length_batches(lengths: list[int], tokens_per_batch: int) -> list[list[int]]:
    """Indices sorted by length (longest first, ties by index), cut so that rows x longest <= the budget."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= tokens_per_batch:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@dataclass
class CapturedBatch:
    """The target's features of some of the sequences `capture_batches` was given."""

    indices: list[int]  # which sequences, in the order of the rows below
    features: list[torch.Tensor]  # [T_i, n_layers * hidden] each, rounded to bfloat16, on CPU (copies)
    final_hidden: list[torch.Tensor] | None  # [T_i, hidden] each in the target's dtype, on CPU


@torch.no_grad()
def capture_batches(
    model: PreTrainedModel,
    sequences: list[list[int]],
    layer_ids: list[int],
    *,
    pad_id: int,
    tokens_per_batch: int,
    final_hidden: bool = False,
) -> Iterator[CapturedBatch]:
    """Run the target over token-id sequences in batches sorted by length (right padding, attention
    mask, at most `tokens_per_batch` padded tokens a forward) and yield each batch's features.

    The one forward-and-capture of the cache build, online training and the benches: features are
    rounded to bfloat16, the precision the cache stores before any encoding, so a draft trained from
    the cache and one trained online see the same numbers. With `final_hidden`, also the final
    normalised state of the same forward (the teacher of Eagle3 and DSpark).
    """
    device = next(model.parameters()).device
    for batch in length_batches([len(s) for s in sequences], tokens_per_batch):
        width = len(sequences[batch[0]])
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        lengths = [len(sequences[i]) for i in batch]
        for row, (i, n) in enumerate(zip(batch, lengths, strict=True)):
            ids[row, :n] = torch.as_tensor(sequences[i], dtype=torch.long)
            attention[row, :n] = 1
        features, final = _forward(model, ids.to(device), layer_ids, attention.to(device))
        features = features.to(device="cpu", dtype=torch.bfloat16)
        final = final.cpu() if final_hidden else None
        yield CapturedBatch(
            indices=batch,
            features=[features[row, :n].clone() for row, n in enumerate(lengths)],
            final_hidden=None if final is None else [final[row, :n].clone() for row, n in enumerate(lengths)],
        )


@dataclass
class TargetStep:
    logits: torch.Tensor  # [n_new, vocab] float32 ([1, vocab] when only the last position's is asked)
    features: torch.Tensor | None  # [n_new, len(layer_ids) * hidden]; None when not asked


class TargetRunner:
    """Incremental target decoding for one sequence, with a KV cache that can be rolled back.

    `extend(ids)` runs the new tokens and returns their logits and captured features; `rollback(n)`
    keeps only the first n tokens, as speculative decoding needs after a rejection.
    """

    def __init__(self, model: PreTrainedModel, layer_ids: list[int]):
        self.model = model
        self.layer_ids = check_layer_ids(layer_ids, model.config.num_hidden_layers)
        self.cache = DynamicCache()
        self.length = 0

    @torch.no_grad()
    def extend(
        self, token_ids: torch.Tensor, *, features: bool = True, last_logits_only: bool = False
    ) -> TargetStep:
        """Run the new tokens: their float32 logits (only the last one's with `last_logits_only`, as a
        prefill or plain decoding needs) and captured features (none without `features`)."""
        ids = token_ids.reshape(1, -1).to(self.model.device)
        positions = torch.arange(self.length, self.length + ids.shape[1], device=ids.device).unsqueeze(0)
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            past_key_values=self.cache,  # renamed `cache` in late 5.x; accepted until 5.40 (pinned)
            use_cache=True,
            output_hidden_states=features,
            logits_to_keep=1 if last_logits_only else 0,
        )
        self.length += ids.shape[1]
        captured = None
        if features:
            captured = torch.cat([out.hidden_states[i + 1][0] for i in self.layer_ids], dim=-1)
        return TargetStep(logits=out.logits[0].float(), features=captured)

    def rollback(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)  # a negative count removes that many tokens
            self.length = length
