"""Eagle3: one decoder layer over fused target features, trained by training-time test (arXiv 2503.01840).

The target's residual stream after three chosen layers (low, mid, high) is concatenated and projected by
`fc` to the draft width. The single `midlayer` attends over [embedding of the next token; hidden]
(2d inputs, each half with its own RMSNorm), and `norm` plus the draft LM head give the next token.

Training-time test (TTT) unrolls `ttt_steps` steps. Index i of step 0 pairs the target feature of
position i with token i+1 and predicts token i+2; step k > 0 feeds back the draft's own (pre-norm) output
at index i from step k-1 with token i+k+1 and predicts token i+k+2, at RoPE position i+k. Every index is
its own chain: a query at step k sees the step-0 keys of positions 0..i and its own keys of steps 1..k
(the "diagonal"), exactly what chain drafting from context position i sees at inference. This is
SpecForge's flex-attention mask (`generate_eagle3_mask`). EAGLE's `traineagle3/cnets.py` and SpecForge's
eager path also hide step-0 keys i-k+1..i, which inference never does (EAGLE issue #247, SpecForge
PR #245), so we do not.

Loss: soft cross-entropy to the target's next-token distribution (or the next token itself when no teacher
is given), only where the predicted token is supervised, weighted 0.8^k per step and normalised by the
weight of the supervised rows, as `losses.weighted_block_cross_entropy` does for DFlash. The trainer hands
over the target's final hidden states [B, T, d], not its logits (4096 tokens x 151,936 fp32 = 2.5 GB):
the frozen head forms the teacher's logits, like the draft's, only for supervised rows and a chunk of rows
at a time, with the gradient formed chunk by chunk (`losses.chunked_linear_loss`).

Vocabulary: the draft shares the target's embedding, frozen. With the full vocabulary its LM head is the
target's head, frozen (like DFlash). With a reduced vocabulary (the N most frequent supervised tokens,
`build_draft_vocab`) the head is a separate trainable [N, d] matrix initialised from the target head's
rows (EAGLE3 trains it from a random start; copying the rows only gives it a better start). `d2t` holds
offsets (draft id + d2t[draft id] = target id) and `t2d` a bool mask over the target vocabulary, as the
engines read them.

Weight names are those vLLM's and SGLang's `LlamaForCausalLMEagle3` load: `fc`, `midlayer.*`, `norm`,
`lm_head`, `d2t`, `t2d`; the residual is taken before `hidden_norm` (`norm_before_residual: false`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from deepspec.models.drafts.files import (
    WEIGHTS_FILE,
    load_weights,
    missing_fields,
    read_config,
    read_export,
    read_weights,
    tensor_problems,
    write_draft_files,
)
from deepspec.models.drafts.kv_cache import DecodeCache, decode_session
from deepspec.models.drafts.layers import MLP, GroupedQueryProjections, RMSNorm, apply_rotary, rotary
from deepspec.models.drafts.spec import DraftInputs, DraftSpec, Samples, Stats
from deepspec.models.errors import ConfigError
from deepspec.models.losses import LOSS_CHUNK_ROWS, chunked_linear_loss
from deepspec.models.target import check_layer_ids

log = logging.getLogger(__name__)

NAME = "eagle3"
ARCHITECTURE = "LlamaForCausalLMEagle3"
NUM_FEATURE_LAYERS = 3  # the engines' fc is [d, 3 * target_hidden_size]


def default_layer_ids(num_layers: int) -> list[int]:
    """EAGLE3's low/mid/high layers in the trainer's convention (output of layer i): 1, L/2 - 1, L - 4.

    These are vLLM's and SGLang's defaults (2, L // 2, L - 3), which count the input of a layer, minus one;
    clamped so that shallow test targets still get valid ids.
    """
    return [min(max(i, 0), num_layers - 1) for i in (1, num_layers // 2 - 1, num_layers - 4)]


@dataclass
class Eagle3Settings:
    """`algo=eagle3`: the values and their meaning are in conf/algo/eagle3.yaml."""

    name: str
    ttt_steps: int
    step_decay: float
    draft_vocab_size: int | None

    max_draft_tokens = None  # the chain is a loop: any length runs (`Eagle3Draft.max_draft_tokens`)

    def problems(self, layer_ids: list[int], num_hidden_layers: int | None) -> list[str]:
        problems = shape_problems(layer_ids, num_hidden_layers, self.ttt_steps, self.draft_vocab_size)
        if not 0 < self.step_decay <= 1:
            problems.append(f"algo.step_decay={self.step_decay}: expected a weight in (0, 1]")
        return problems


def shape_problems(
    layer_ids: list[int],
    num_hidden_layers: int | None,
    ttt_steps: int,
    draft_vocab_size: int | None,
    vocab_size: int | None = None,
) -> list[str]:
    """What an Eagle3 draft's shape needs: three target layers, a training-time test step, a draft
    vocabulary within the target's (when `vocab_size` is known). The one set of rules, checked when
    composing and when a draft is built."""
    problems = []
    if len(layer_ids) != NUM_FEATURE_LAYERS:
        usual = ",".join(map(str, default_layer_ids(num_hidden_layers))) if num_hidden_layers else ""
        hint = (
            f"for this {num_hidden_layers}-layer target pass 'target.layer_ids=[{usual}]'"
            if len(set(usual.split(","))) == NUM_FEATURE_LAYERS
            else "EAGLE3 takes layers 1, L/2 - 1 and L - 4 of an L-layer target"
        )
        problems.append(
            f"target.layer_ids={list(layer_ids)}: Eagle3 fuses exactly {NUM_FEATURE_LAYERS} target "
            f"layers (low, mid, high), as the engines' fc reads them; {hint}, or add a "
            "conf/target_algo/<target>_eagle3.yaml preset"
        )
    if ttt_steps < 1:
        problems.append(f"algo.ttt_steps={ttt_steps}: expected at least one training-time test step")
    if draft_vocab_size is not None and not 1 <= draft_vocab_size <= (vocab_size or draft_vocab_size):
        limit = f"1..{vocab_size} (the target's vocabulary)" if vocab_size else "a positive size"
        problems.append(f"algo.draft_vocab_size={draft_vocab_size}: expected {limit} or null")
    return problems


@dataclass
class Eagle3Config:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    target_layer_ids: list[int]  # trainer convention: output of target layer i, HF hidden_states[i + 1]
    ttt_steps: int  # training-time test steps; also the inference chain length
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    target_model_type: str = "llama"
    target_num_hidden_layers: int = 0

    @classmethod
    def from_target(
        cls, target_config, *, layer_ids: list[int], ttt_steps: int, draft_vocab_size: int | None = None
    ) -> Eagle3Config:
        """Draft geometry from the target's config: same width, heads and MLP as one target layer."""
        text = getattr(target_config, "text_config", None) or target_config
        heads = text.num_attention_heads
        rope = getattr(text, "rope_parameters", None) or {}
        layers = text.num_hidden_layers
        problems = shape_problems(layer_ids, layers, ttt_steps, draft_vocab_size, text.vocab_size)
        if problems:
            raise ConfigError("; ".join(problems))
        check_layer_ids(list(layer_ids), layers)
        draft_vocab = text.vocab_size if draft_vocab_size is None else draft_vocab_size
        return cls(
            hidden_size=text.hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate_size=text.intermediate_size,
            vocab_size=text.vocab_size,
            draft_vocab_size=draft_vocab,
            target_layer_ids=list(layer_ids),
            ttt_steps=ttt_steps,
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))),
            max_position_embeddings=getattr(text, "max_position_embeddings", 4096),
            target_model_type=text.model_type,
            target_num_hidden_layers=text.num_hidden_layers,
        )

    @property
    def reduced_vocab(self) -> bool:
        return self.draft_vocab_size < self.vocab_size

    def to_hf_dict(self) -> dict:
        """The `config.json` vLLM and SGLang read for `LlamaForCausalLMEagle3`, plus a `deepspec` block.

        Aux layer ids differ by engine: vLLM reads the top-level list and captures the input of layer j
        (the output of j - 1), so it gets our id + 1; SGLang reads `eagle_config` and adds the 1 itself
        (`set_eagle3_layers_to_capture`), so it gets our id.
        """
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",  # the draft layer is Llama-style whatever the target family
            "hidden_size": self.hidden_size,
            "target_hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "tie_word_embeddings": False,  # SGLang would otherwise use the embedding as the LM head
            "attention_bias": False,
            "mlp_bias": False,
            "norm_before_residual": False,  # vLLM: residual = hidden before hidden_norm, as trained here
            "eagle_aux_hidden_state_layer_ids": [i + 1 for i in self.target_layer_ids],
            "eagle_config": {
                "eagle_aux_hidden_state_layer_ids": list(self.target_layer_ids),
                "use_aux_hidden_state": True,
            },
            "deepspec": {
                "target_layer_ids": list(self.target_layer_ids),
                "ttt_steps": self.ttt_steps,
                "target_model_type": self.target_model_type,
                "target_num_hidden_layers": self.target_num_hidden_layers,
            },
        }

    @classmethod
    def from_hf_dict(cls, data: dict) -> Eagle3Config:
        if ARCHITECTURE not in data.get("architectures", []):
            raise ConfigError(
                f"config.json architectures={data.get('architectures')}: expected {ARCHITECTURE}"
            )
        ours = data.get("deepspec")
        if not isinstance(ours, dict):
            raise ConfigError(
                "config.json: no `deepspec` block; it was not written by DeepSpec's Eagle3 trainer"
            )
        return cls(
            hidden_size=data["hidden_size"],
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data["num_key_value_heads"],
            head_dim=data["head_dim"],
            intermediate_size=data["intermediate_size"],
            vocab_size=data["vocab_size"],
            draft_vocab_size=data["draft_vocab_size"],
            target_layer_ids=list(ours["target_layer_ids"]),
            ttt_steps=ours["ttt_steps"],
            rms_norm_eps=data["rms_norm_eps"],
            rope_theta=data["rope_theta"],
            max_position_embeddings=data["max_position_embeddings"],
            target_model_type=ours["target_model_type"],
            target_num_hidden_layers=ours["target_num_hidden_layers"],
        )


# ---------------------------------------------------------------------------------------------------------
# Draft vocabulary


def token_counts(sequences: Sequence[tuple[torch.Tensor, torch.Tensor]], vocab_size: int) -> torch.Tensor:
    """How often each target token is supervised: sequences are (input_ids [T], loss_mask [T]) pairs."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids, mask in sequences:
        counts += torch.bincount(ids[mask.bool()].long().cpu(), minlength=vocab_size)
    return counts


def build_draft_vocab(counts: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(d2t, t2d)` for the `draft_vocab_size` most frequent tokens (ties: lower id first).

    Draft ids follow target-id order, as in EAGLE3's vocabulary builder: d2t[i] = target_id - i (int64,
    [N]) and t2d is a bool mask over the target vocabulary ([V]).
    """
    vocab_size = counts.shape[0]
    if not 1 <= draft_vocab_size <= vocab_size:
        raise ConfigError(f"draft_vocab_size={draft_vocab_size}: expected 1..{vocab_size}")
    order = torch.sort(-counts.long(), stable=True).indices  # stable: equal counts keep id order
    kept = order[:draft_vocab_size].sort().values
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[kept] = True
    return kept - torch.arange(draft_vocab_size), t2d


# ---------------------------------------------------------------------------------------------------------
# Attention with the training-time-test mask


def ttt_attention_mask(seq_len: int, step: int) -> torch.Tensor:
    """Dense form of the TTT mask at `step`: [T, (step + 1) * T] bool, True = may attend.

    Keys are the step-0 keys of every position followed by the keys of steps 1..step, T each. The model
    never builds this (it scores the diagonal keys directly); it documents the pattern and tests use it.
    """
    pos = torch.arange(seq_len)
    blocks = [pos[None, :] <= pos[:, None]] + [pos[None, :] == pos[:, None]] * step
    return torch.cat(blocks, dim=1)


def ttt_attend(
    q: torch.Tensor,
    k0: torch.Tensor,
    v0: torch.Tensor,
    diag_k: Sequence[torch.Tensor],
    diag_v: Sequence[torch.Tensor],
    q_index: torch.Tensor,
) -> torch.Tensor:
    """Attention of n queries to the step-0 keys (causal) and to their own keys of later steps.

    q: [B, H, n, hd]; k0, v0: [B, H, m, hd] for the m positions of step 0; diag_k, diag_v: one
    [B, H, n, hd] per step after step 0, aligned with the queries; q_index: [n], each query's own
    position among the m step-0 keys. Costs O(n m) rather than the O(n m k) of a dense mask.
    """
    scale = q.shape[-1] ** -0.5
    scores = (q @ k0.transpose(-1, -2)).float() * scale
    visible = torch.arange(k0.shape[-2], device=q.device)[None, :] <= q_index[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    if diag_k:
        diagonal = torch.stack([(q * k).sum(-1) for k in diag_k], dim=-1).float() * scale
        scores = torch.cat([scores, diagonal], dim=-1)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    m = k0.shape[-2]
    out = probs[..., :m] @ v0
    for s, v in enumerate(diag_v):
        out = out + probs[..., m + s, None] * v
    return out


@dataclass
class TTTCache:
    """Keys and values of one chain: step 0's for every position, then one per later step (diagonal)."""

    k0: torch.Tensor | None = None
    v0: torch.Tensor | None = None
    diag_k: list[torch.Tensor] = field(default_factory=list)
    diag_v: list[torch.Tensor] = field(default_factory=list)

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.k0 is None:
            self.k0, self.v0 = k, v
        else:
            self.diag_k.append(k)
            self.diag_v.append(v)


class Eagle3Attention(GroupedQueryProjections):
    """Llama attention whose q/k/v read the 2d-wide [embedding; hidden] input."""

    def __init__(self, cfg: Eagle3Config):
        d = cfg.hidden_size
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        super().__init__(2 * d, d, heads, kv_heads, cfg.head_dim)

    def forward(
        self,
        x: torch.Tensor,  # [B, n, 2d]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [n, hd]
        q_index: torch.Tensor,  # [n]
        cache: TTTCache,
    ) -> torch.Tensor:
        groups = self.num_heads // self.num_kv_heads
        q = apply_rotary(self.queries(x), *rope)
        k, v = self.keys_values(x)
        # query head h reads kv head h // groups, as HF's repeat_kv and SDPA's enable_gqa do
        cache.add(apply_rotary(k, *rope).repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1))
        return self.output(ttt_attend(q, cache.k0, cache.v0, cache.diag_k, cache.diag_v, q_index))


class Eagle3Layer(nn.Module):
    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # on the token embedding
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # on the fused / fed-back hidden
        self.self_attn = Eagle3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, embeds, hidden, rope, q_index, cache: TTTCache) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        h = hidden + self.self_attn(x, rope, q_index, cache)  # residual: the hidden before its norm
        return h + self.mlp(self.post_attention_layernorm(h))


# ---------------------------------------------------------------------------------------------------------
# Loss


def ttt_loss(
    step_logits: Sequence[torch.Tensor], step_teacher: Sequence[torch.Tensor], step_decay: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Soft cross-entropy of every supervised row of every step, weighted step_decay^k, normalised.

    step_logits[k]: [n_k, Vd] draft logits of step k's supervised rows; step_teacher[k]: [n_k, Vd]
    teacher probabilities. Returns the loss and per-step top-1 agreement with the teacher
    (`slot_hits`, `slot_counts`, the keys DFlash's loss uses, so the trainer treats both alike).
    """
    steps = len(step_logits)
    hits, counts = torch.zeros(steps), torch.zeros(steps)
    total, weight = None, 0.0
    for k, (logits, teacher) in enumerate(zip(step_logits, step_teacher, strict=True)):
        w = step_decay**k
        ce = -(teacher * F.log_softmax(logits.float(), dim=-1)).sum(-1)
        total = w * ce.sum() if total is None else total + w * ce.sum()
        weight += w * ce.numel()
        counts[k] = ce.numel()
        hits[k] = float((logits.argmax(-1) == teacher.argmax(-1)).sum())
    assert total is not None, "ttt_loss needs at least one step"
    return total / max(weight, 1e-9), {"slot_hits": hits, "slot_counts": counts}


# ---------------------------------------------------------------------------------------------------------
# The draft


@dataclass
class Eagle3Proposal:
    """A sampled chain after the anchor (`Eagle3Draft.propose`)."""

    tokens: list[int]
    probs: torch.Tensor  # [len(tokens), vocab] float32, the draft's device: the law each token was drawn from


class Eagle3Draft(nn.Module):
    def __init__(
        self,
        cfg: Eagle3Config,
        embed_weight: torch.Tensor,
        head_weight: torch.Tensor,
        d2t: torch.Tensor | None = None,
    ):
        super().__init__()
        expected = (cfg.vocab_size, cfg.hidden_size)
        for name, w in (("embedding", embed_weight), ("LM head", head_weight)):
            if tuple(w.shape) != expected:
                raise ConfigError(
                    f"target {name} has shape {tuple(w.shape)}; the draft config needs {expected}"
                )
        self.cfg = cfg
        self.num_draft_tokens = cfg.ttt_steps  # chain length `speculative_generate` drafts per round
        self.max_draft_tokens: int | None = None  # the chain is a loop: any length runs
        self._decode_cache: DecodeCache | None = None  # set inside `decoding()`
        self.fc = nn.Linear(NUM_FEATURE_LAYERS * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # The target's embedding: frozen, shared, never saved with the draft.
        self.embed_tokens = nn.Embedding.from_pretrained(embed_weight, freeze=True)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        if cfg.reduced_vocab:
            if d2t is None or d2t.shape != (cfg.draft_vocab_size,):
                raise ConfigError(
                    f"draft_vocab_size={cfg.draft_vocab_size} < vocab_size={cfg.vocab_size} needs a d2t "
                    f"of {cfg.draft_vocab_size} offsets (build it with build_draft_vocab)"
                )
        else:
            d2t = torch.zeros(cfg.vocab_size, dtype=torch.long)
            self.lm_head.weight = nn.Parameter(head_weight, requires_grad=False)  # the target's, frozen
        ids = torch.arange(cfg.draft_vocab_size) + d2t.long().cpu()
        if ids.min() < 0 or ids.max() >= cfg.vocab_size or ids.unique().numel() != ids.numel():
            raise ConfigError("d2t does not map the draft vocabulary onto distinct target ids")
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[ids] = True
        self.register_buffer("d2t", d2t.long().clone())
        self.register_buffer("t2d", t2d)
        self.apply(self._init_weights)
        if cfg.reduced_vocab:  # start the trainable head from the target head's rows
            with torch.no_grad():
                self.lm_head.weight.copy_(head_weight[ids].to(self.lm_head.weight.dtype))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            nn.init.normal_(module.weight, std=0.02)

    @property
    def draft_to_target(self) -> torch.Tensor:
        """Target id of every draft id: [Vd]."""
        return torch.arange(self.cfg.draft_vocab_size, device=self.d2t.device) + self.d2t

    def target_to_draft(self) -> torch.Tensor:
        """Draft id of every target id, -1 outside the draft vocabulary: [V]."""
        index = torch.full((self.cfg.vocab_size,), -1, dtype=torch.long, device=self.d2t.device)
        index[self.draft_to_target] = torch.arange(self.cfg.draft_vocab_size, device=self.d2t.device)
        return index

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """fc, midlayer, norm, the vocabulary maps, and the LM head only when it is the draft's own."""
        skip = ("embed_tokens.",) if self.cfg.reduced_vocab else ("embed_tokens.", "lm_head.")
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

    def to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., Vd] as target-vocabulary ones [..., V], -inf outside the draft's."""
        if not self.cfg.reduced_vocab:
            return logits
        out = logits.new_full((*logits.shape[:-1], self.cfg.vocab_size), float("-inf"))
        out[..., self.draft_to_target] = logits
        return out

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids).to(self.fc.weight.dtype)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(positions, self.cfg.head_dim, self.cfg.rope_theta)

    def ttt_hidden(self, features: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Pre-norm draft output of every TTT step: `ttt_steps` tensors [B, T, d].

        features: [B, T, 3d] target features (layers in `target_layer_ids` order); input_ids: [B, T].
        Batches are right-padded: causal attention never looks right, so padding needs no mask, only a
        zero loss mask.
        """
        b, t = input_ids.shape
        device = input_ids.device
        index = torch.arange(t, device=device)
        hidden = self.fc(features.to(self.fc.weight.dtype))
        cache = TTTCache()
        outputs = []
        for k in range(self.cfg.ttt_steps):
            # index i of step k reads token i+k+1 (zero past the end: such chains are never supervised)
            ids = torch.cat([input_ids[:, k + 1 :], input_ids.new_zeros(b, min(k + 1, t))], dim=1)
            hidden = self.midlayer(self._embed(ids), hidden, self._rope(index + k), index, cache)
            outputs.append(hidden)
        return outputs

    def ttt_logits(self, features: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of every step and index: [ttt_steps, B, T, Vd]. For tests and probes."""
        return torch.stack([self.lm_head(self.norm(h)) for h in self.ttt_hidden(features, input_ids)]).float()

    def supervised_rows(
        self, hidden: Sequence[torch.Tensor], loss_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows every TTT step supervises: normed states x [n, d] and each row's step k, batch row b
        and predicted token t ([n] each), all steps together, in (b, t, k) order.

        Index i of step k predicts token t = i + k + 2; the row is supervised when t < T and loss_mask[t]
        (the project's convention: the mask marks supervised *tokens*). Rows of one token sit together,
        so a chunk of rows needs the teacher of few tokens.
        """
        seq_len = loss_mask.shape[1]
        xs, ks, bs, ts = [], [], [], []
        for k, h in enumerate(hidden):
            targets = torch.arange(k + 2, max(seq_len, k + 2), device=loss_mask.device)
            rows_b, rows_i = loss_mask[:, targets].bool().nonzero(as_tuple=True)
            xs.append(self.norm(h[rows_b, rows_i]))  # hidden index i = t - k - 2 predicts token t
            ks.append(torch.full_like(rows_b, k))
            bs.append(rows_b)
            ts.append(targets[rows_i])
        k, b, t = torch.cat(ks), torch.cat(bs), torch.cat(ts)
        order = torch.argsort((b * seq_len + t) * len(hidden) + k)
        return torch.cat(xs)[order], k[order], b[order], t[order]

    def teacher(
        self,
        input_ids: torch.Tensor,
        target_logits: torch.Tensor | None = None,
        target_hidden: torch.Tensor | None = None,
        target_head: torch.Tensor | None = None,
        target_softcap: float | None = None,
    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """`teacher(b, t) -> (probs [n, Vd] float32, keep [n] bool)`: the law of token t of row b.

        From target_logits [B, T, V] or target_hidden [B, T, d] (row t - 1, through `target_head`, in
        its dtype, then softcap * tanh(logits / softcap) when `target_softcap` is set, as Gemma's head
        does): softmax over the draft vocabulary, kept when the target's argmax lies inside it (EAGLE3).
        With neither: the token itself, kept when it lies inside the draft vocabulary.
        """
        t2d_index, draft_ids = self.target_to_draft(), self.draft_to_target
        vd = self.cfg.draft_vocab_size

        @torch.no_grad()
        def law(b: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if target_logits is None and target_hidden is None:
                ids = t2d_index[input_ids[b, t]]
                return F.one_hot(ids.clamp(min=0), vd).float(), ids >= 0
            if target_logits is not None:
                src = target_logits.device
                logits = target_logits[b.to(src), (t - 1).to(src)].to(b.device).float()
            else:
                rows = target_hidden[b.to(target_hidden.device), (t - 1).to(target_hidden.device)]
                logits = rows.to(device=target_head.device, dtype=target_head.dtype) @ target_head.t()
                logits = logits.to(b.device).float()
                if target_softcap:
                    logits = torch.tanh(logits / target_softcap) * target_softcap
            keep = self.t2d[logits.argmax(-1)]
            if self.cfg.reduced_vocab:
                logits = logits[:, draft_ids]
            return torch.softmax(logits, dim=-1), keep

        return law

    def forward_train(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        target_logits: torch.Tensor | None = None,
        *,
        target_hidden: torch.Tensor | None = None,
        target_head: torch.Tensor | None = None,
        target_softcap: float | None = None,
        step_decay: float = 0.8,  # EAGLE3 / SpecForge weight per TTT step
        chunk_rows: int | None = LOSS_CHUNK_ROWS,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """TTT loss and per-step agreement for a batch ([B, T, ...], or one unbatched sequence).

        Index i of step k predicts token t = i + k + 2 (`supervised_rows`). The teacher is the target's
        distribution for t, softmax(target logits at t - 1) over the draft vocabulary (rows whose target
        argmax lies outside it are skipped, as in EAGLE3), from `target_hidden` [B, T, d] (the target's
        final normalised states, through `target_head`, by default the draft's head when it is the
        target's) or `target_logits` [B, T, V]; with neither, the token itself (rows whose token lies
        outside the draft vocabulary are skipped). See `teacher`.

        Logits, the draft's and the teacher's, are formed only for supervised rows, `chunk_rows` rows at a
        time, gradients in the forward (`losses.chunked_linear_loss`): no [B, T, V] or [K, B, T, Vd]
        tensor exists. chunk_rows=None forms every step's logits at once and keeps them for the backward
        (`ttt_loss`, the reference).
        """
        if target_logits is not None and target_hidden is not None:
            raise ValueError("pass at most one of target_logits and target_hidden")
        if input_ids.dim() == 1:
            features, input_ids, loss_mask = features[None], input_ids[None], loss_mask[None]
            target_logits = None if target_logits is None else target_logits[None]
            target_hidden = None if target_hidden is None else target_hidden[None]
        if target_hidden is not None and target_head is None:
            if self.cfg.reduced_vocab:
                raise ValueError("target_hidden with a reduced draft vocabulary needs target_head")
            target_head = self.lm_head.weight  # the target's head, frozen
        teacher = self.teacher(input_ids, target_logits, target_hidden, target_head, target_softcap)
        hidden = self.ttt_hidden(features, input_ids)
        x, step, rows_b, tokens = self.supervised_rows(hidden, loss_mask.to(input_ids.device))
        steps = len(hidden)
        if chunk_rows is None:
            probs, keep = teacher(rows_b, tokens)
            step_logits, step_teacher = [], []
            for k in range(steps):
                picked = (step == k) & keep
                step_logits.append(self.lm_head(x[picked]))
                step_teacher.append(probs[picked])
            return ttt_loss(step_logits, step_teacher, step_decay)

        seq_len = input_ids.shape[1]
        step_weight = step_decay ** torch.arange(steps, device=x.device, dtype=torch.float32)
        hits = torch.zeros(steps, device=x.device)
        counts = torch.zeros(steps, device=x.device)

        def loss_fn(logits: torch.Tensor, rows: slice, need_grad: bool):
            k = step[rows]
            key = rows_b[rows] * seq_len + tokens[rows]  # sorted: each token's rows are adjacent
            token, inverse = torch.unique_consecutive(key, return_inverse=True)
            probs, keep = teacher(token // seq_len, token % seq_len)
            probs, keep = probs[inverse], keep[inverse]
            scale = step_weight[k] * keep
            counts.index_add_(0, k, keep.float())
            hits.index_add_(0, k, ((logits.argmax(-1) == probs.argmax(-1)) & keep).float())
            lse = logits.logsumexp(-1)
            share = (scale * (lse - (probs * logits).sum(-1))).sum()  # the teacher sums to 1
            if not need_grad:
                return share, None
            # d soft-CE / d logits = softmax(logits) - teacher
            return share, logits.sub_(lse[:, None]).exp_().sub_(probs).mul_(scale[:, None])

        total = chunked_linear_loss(loss_fn, [(x, self.lm_head.weight)], chunk_rows)
        loss = total / (step_weight * counts).sum().clamp(min=1e-9)
        return loss, {"slot_hits": hits.cpu(), "slot_counts": counts.cpu()}

    def forward(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        target_logits: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`forward_train` (what a DeepSpeed engine calls); keyword arguments as there."""
        return self.forward_train(features, input_ids, loss_mask, target_logits, **kwargs)

    def decoding(self) -> AbstractContextManager[None]:
        """Within it, drafting calls are one sequence's rounds: step 0's keys and values of the context
        are kept and only the positions committed since the call before are projected (`kv_cache.py`);
        step 0 then runs the last position's query alone. Outside it, every call recomputes the context."""
        return decode_session(self, 1)

    @torch.no_grad()
    def chain_logits(
        self,
        context_features: torch.Tensor,
        context_ids: torch.Tensor,
        anchor_token: int,
        num_steps: int,
        tokens: Sequence[int] | None = None,
        pick: Callable[[torch.Tensor], int | torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Draft-vocabulary logits [num_steps, Vd] of a chain after the anchor; row s is for position p+s+1.

        context_features [p, 3d] and context_ids [p] cover positions 0..p-1, the anchor sits at p. Step 0
        runs every context position (position j reads feature j and token j+1, the last one the anchor);
        step s > 0 feeds the previous step's output at position p-1 back with the token of position p+s:
        `tokens[s - 1]` when given (teacher forcing, target ids), else `pick(row s-1)` (a target id; by
        default the argmax). Outside `decoding()` each call recomputes the context: O(p) projections and
        O(p^2) attention scores for one layer; inside, O(new positions) projections and O(p) scores.
        """
        p = context_ids.shape[0]
        if p < 1:
            raise ConfigError("Eagle3 drafting needs at least one context position (the prompt was empty)")
        device = self.fc.weight.device
        step0 = self._cached_step0 if self._decode_cache is not None else self._step0
        hidden, cache = step0(context_features, context_ids, anchor_token)
        rows = [self.lm_head(self.norm(hidden))[0, 0]]
        last = torch.tensor([p - 1], device=device)
        for s in range(1, num_steps):
            if tokens is not None:
                token = tokens[s - 1]
            elif pick is not None:
                token = pick(rows[-1])
            else:
                token = int(self.draft_to_target[rows[-1].argmax()])
            embeds = self._embed(torch.as_tensor(token, device=device).reshape(1, 1))
            hidden = self.midlayer(embeds, hidden, self._rope(last + s), last, cache)
            rows.append(self.lm_head(self.norm(hidden))[0, 0])
        return torch.stack(rows).float()

    def _step0_inputs(
        self, context_features: torch.Tensor, context_ids: torch.Tensor, anchor_token: int, new: slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 0's token embeddings and fused features of context positions `new`: [1, n, d] each."""
        device = self.fc.weight.device
        ids = torch.cat(
            [context_ids[new.start + 1 : new.stop].to(device), torch.tensor([anchor_token], device=device)]
        )
        features = context_features[new].to(device=device, dtype=self.fc.weight.dtype)
        return self._embed(ids[None]), self.fc(features[None])

    def _step0(
        self, context_features: torch.Tensor, context_ids: torch.Tensor, anchor_token: int
    ) -> tuple[torch.Tensor, TTTCache]:
        """Step 0 over every context position, as training runs it: the last position's output [1, 1, d]
        and the chain's cache."""
        p = context_ids.shape[0]
        embeds, hidden = self._step0_inputs(context_features, context_ids, anchor_token, slice(0, p))
        cache = TTTCache()
        index = torch.arange(p, device=hidden.device)
        return self.midlayer(embeds, hidden, self._rope(index), index, cache)[:, -1:], cache

    def _cached_step0(
        self, context_features: torch.Tensor, context_ids: torch.Tensor, anchor_token: int
    ) -> tuple[torch.Tensor, TTTCache]:
        """`_step0` from the decode cache: the new positions' keys and values, then one query."""
        kv = self._decode_cache.layers[0]
        new = self._decode_cache.new_positions(context_ids.shape[0])
        layer, attn = self.midlayer, self.midlayer.self_attn
        embeds, hidden = self._step0_inputs(context_features, context_ids, anchor_token, new)
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)
        rope = self._rope(torch.arange(new.start, new.stop, device=x.device))
        groups = attn.num_heads // attn.num_kv_heads
        k, v = attn.keys_values(x)
        kv.length = new.start
        kv.extend(apply_rotary(k, *rope).repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1))
        # Position p-1 reads the anchor, which a caller may change between calls on one context, so it
        # stays uncommitted: the next call projects it again (one position) with whatever anchor it has.
        self._decode_cache.length = new.stop - 1
        q = apply_rotary(attn.queries(x[:, -1:]), rope[0][-1:], rope[1][-1:])
        k0, v0 = kv.committed()
        last = torch.tensor([new.stop - 1], device=x.device)
        h = hidden[:, -1:] + attn.output(ttt_attend(q, k0, v0, [], [], last))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, TTTCache(k0=k0, v0=v0)

    @torch.no_grad()
    def draft_logits(
        self, context_features: torch.Tensor, anchor_token: int, *, context_ids: torch.Tensor
    ) -> torch.Tensor:
        """[block_size, V] target-vocabulary logits of a greedy chain (argmax fed back inside the chain).

        Unlike DFlash, Eagle3 needs the context's token ids: position j's step-0 input is token j+1.
        Greedy feeding keeps every row a fixed function of the context, so drafts drawn from the rows
        afterwards are lossless too, but above temperature 0 a draft that differs from the argmax follows
        a chain built on another token, and is rarely accepted: `speculative_generate` uses `propose`.
        """
        return self.to_target_vocab(
            self.chain_logits(context_features, context_ids, anchor_token, self.num_draft_tokens)
        )

    @torch.no_grad()
    def propose(
        self,
        context_features: torch.Tensor,
        anchor_token: int,
        *,
        temperature: float,
        generator: torch.Generator | None,
        context_ids: torch.Tensor,
    ) -> Eagle3Proposal:
        """A chain drawn step by step, each step fed the token drawn at the step before (as upstream's
        evaluator drafts): step s's law depends on the drafts before it, so the tokens come with the law
        q each was drawn from (the `ProposingDrafter` protocol of `models/speculative.py`).

        q is softmax(logits / temperature) over the target vocabulary (0 outside a reduced draft
        vocabulary), in float32 on the draft's device, drawn from with `generator` (on that device); at
        temperature 0 it is one-hot on the argmax, and the chain is `draft_logits`'s. Tokens stay on the
        device until the chain is drawn: one host transfer.
        """
        tokens: list[torch.Tensor] = []
        laws: list[torch.Tensor] = []

        def draw(row: torch.Tensor) -> torch.Tensor:
            logits = self.to_target_vocab(row.float())
            if temperature == 0:
                token = logits.argmax()
                law = torch.nn.functional.one_hot(token, logits.shape[-1]).float()
            else:
                law = torch.softmax(logits / temperature, dim=-1)
                token = torch.multinomial(law, 1, generator=generator)[0]
            tokens.append(token)
            laws.append(law)
            return token

        rows = self.chain_logits(
            context_features, context_ids, anchor_token, self.num_draft_tokens, pick=draw
        )
        draw(rows[-1])  # the last step's token is drafted too, though nothing reads it back
        return Eagle3Proposal(tokens=torch.stack(tokens).tolist(), probs=torch.stack(laws))


# ---------------------------------------------------------------------------------------------------------
# Building and training


def build(settings: Eagle3Settings, inputs: DraftInputs) -> Eagle3Draft:
    """The draft; with a reduced vocabulary, its `draft_vocab_size` most supervised tokens of the data."""
    cfg = Eagle3Config.from_target(
        inputs.target_config,
        layer_ids=inputs.layer_ids,
        ttt_steps=settings.ttt_steps,
        draft_vocab_size=settings.draft_vocab_size,
    )
    d2t = None
    if cfg.reduced_vocab:
        if inputs.token_counts is None:
            raise ConfigError(f"algo.draft_vocab_size={cfg.draft_vocab_size} needs the data's token counts")
        counts = inputs.token_counts()
        d2t, _ = build_draft_vocab(counts, cfg.draft_vocab_size)
        kept = counts[torch.arange(cfg.draft_vocab_size) + d2t].sum() / counts.sum().clamp(min=1)
        log.info("draft vocabulary: %d tokens cover %.1f%% of supervised tokens", d2t.numel(), 100 * kept)
    return Eagle3Draft(cfg, inputs.embed, inputs.head, d2t=d2t)


def training_loss(
    forward, model: Eagle3Draft, samples: Samples, settings: Eagle3Settings, teacher, generator
) -> tuple[torch.Tensor, Stats]:
    """Whole sequences, right-padded; the training-time test against the target's distribution, step k
    weighted step_decay^k (`forward_train`). `generator` is unused: nothing is sampled."""
    device = model.fc.weight.device
    length = max(int(s["input_ids"].shape[0]) for s in samples)
    width = samples[0]["features"].shape[1]
    features = torch.zeros(len(samples), length, width, device=device)  # where the stream decoded
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.bool)
    # the target's final states, not its logits: the draft applies the head to supervised rows only,
    # a chunk at a time (the law of token t is row t - 1; rows nothing reads stay zero)
    head = teacher.head
    final = torch.zeros(len(samples), length, head.shape[1], device=device, dtype=head.dtype)
    for b, s in enumerate(samples):
        n = s["input_ids"].shape[0]
        features[b, :n], ids[b, :n], mask[b, :n] = s["features"], s["input_ids"], s["loss_mask"]
        if bool(s["loss_mask"][2:].any()):  # a token t >= 2 some step predicts
            final[b, :n] = teacher.final_hidden(s).to(device=device, dtype=head.dtype)
    return forward(
        features, ids.to(device), mask.to(device), target_hidden=final, target_head=head,
        target_softcap=teacher.softcap, step_decay=settings.step_decay,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Files


def save(model: Eagle3Draft, out_dir: Path) -> None:
    """Training output: `config.json` and the trainable weights plus d2t/t2d, each written atomically."""
    write_draft_files(out_dir, model.cfg.to_hf_dict(), model.trainable_state_dict())


def load(draft_dir: Path, embed_weight: torch.Tensor, head_weight: torch.Tensor) -> Eagle3Draft:
    """A draft saved by `save` (or exported), on the target's embedding and LM head."""
    cfg = Eagle3Config.from_hf_dict(read_config(draft_dir))
    state = read_weights(draft_dir)
    model = Eagle3Draft(cfg, embed_weight, head_weight, d2t=state.get("d2t") if cfg.reduced_vocab else None)
    if not cfg.reduced_vocab:
        state.pop("lm_head.weight", None)  # an export carries the target head; we use the one passed in
    # with the full vocabulary the maps are the identity: an export leaves them out (vLLM refuses them)
    shared = ("embed_tokens.",) if cfg.reduced_vocab else ("embed_tokens.", "lm_head.", "d2t", "t2d")
    return load_weights(model, state, draft_dir, shared=shared)


def export(model: Eagle3Draft, out_dir: Path, target_config) -> str:
    """The draft as vLLM and SGLang load `LlamaForCausalLMEagle3`: `config.json` and `model.safetensors`.

    The file always holds `lm_head.weight` (with the full vocabulary, the target's head); `d2t`/`t2d` only
    with a reduced vocabulary (vLLM has no such parameter otherwise and refuses the file; SGLang ignores
    them); never `embed_tokens`, which both engines share from the target.
    """
    cfg = model.cfg
    text = getattr(target_config, "text_config", None) or target_config
    if (text.hidden_size, text.vocab_size) != (cfg.hidden_size, cfg.vocab_size):
        raise ConfigError(
            f"target hidden_size={text.hidden_size}, vocab_size={text.vocab_size}: the draft was built for "
            f"hidden_size={cfg.hidden_size}, vocab_size={cfg.vocab_size}"
        )
    config = cfg.to_hf_dict()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config[key] = getattr(text, key, None)
    # `torch_dtype` for engines on transformers 4, `dtype` for transformers 5
    config["torch_dtype"] = config["dtype"] = str(model.fc.weight.dtype).removeprefix("torch.")
    skip = ("embed_tokens.",) if cfg.reduced_vocab else ("embed_tokens.", "d2t", "t2d")
    write_draft_files(
        out_dir, config, {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    )
    return ARCHITECTURE


def expected_export_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor an Eagle3 export must hold, with its shape, from its `config.json`."""
    d, heads = config["hidden_size"], config["num_attention_heads"]
    kv, inter = config["num_key_value_heads"], config["intermediate_size"]
    hd = config.get("head_dim") or d // heads
    target_d = config.get("target_hidden_size") or d
    draft_vocab = config.get("draft_vocab_size") or config["vocab_size"]
    maps = (
        {"d2t": (draft_vocab,), "t2d": (config["vocab_size"],)} if draft_vocab < config["vocab_size"] else {}
    )
    return {
        "fc.weight": (d, NUM_FEATURE_LAYERS * target_d),
        "midlayer.input_layernorm.weight": (d,),
        "midlayer.hidden_norm.weight": (d,),
        "midlayer.self_attn.q_proj.weight": (heads * hd, 2 * d),
        "midlayer.self_attn.k_proj.weight": (kv * hd, 2 * d),
        "midlayer.self_attn.v_proj.weight": (kv * hd, 2 * d),
        "midlayer.self_attn.o_proj.weight": (d, heads * hd),
        "midlayer.post_attention_layernorm.weight": (d,),
        "midlayer.mlp.gate_proj.weight": (inter, d),
        "midlayer.mlp.up_proj.weight": (inter, d),
        "midlayer.mlp.down_proj.weight": (d, inter),
        "norm.weight": (d,),
        "lm_head.weight": (draft_vocab, d),
        **maps,
    }


REQUIRED_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "rms_norm_eps",
    "vocab_size",
    "draft_vocab_size",
    "eagle_aux_hidden_state_layer_ids",
    "eagle_config",
)


def validate_export(path: Path) -> list[str]:
    """Problems that would stop vLLM or SGLang loading the export, or make it draft wrongly; [] if none."""
    config, shapes, problems = read_export(path)
    if config is None:
        return problems
    if ARCHITECTURE not in config.get("architectures", []):
        problems.append(
            f"config.json: architectures={config.get('architectures')}, expected [{ARCHITECTURE!r}]"
        )
    problems += missing_fields(config, REQUIRED_CONFIG_KEYS)
    if problems:
        return problems
    if config["num_hidden_layers"] != 1:
        problems.append(
            f"config.json: num_hidden_layers={config['num_hidden_layers']}, the export has one layer"
        )
    if config.get("tie_word_embeddings", True):
        problems.append("config.json: tie_word_embeddings must be false (SGLang would tie lm_head to it)")
    top = config["eagle_aux_hidden_state_layer_ids"]
    nested = (config["eagle_config"] or {}).get("eagle_aux_hidden_state_layer_ids")
    if len(top) != NUM_FEATURE_LAYERS:
        problems.append(f"config.json: eagle_aux_hidden_state_layer_ids={top}: need {NUM_FEATURE_LAYERS} ids")
    if nested is None or [i + 1 for i in nested] != list(top):
        problems.append(
            f"config.json: eagle_config.eagle_aux_hidden_state_layer_ids={nested} must be the top-level "
            f"ids {top} minus one (SGLang adds one, vLLM does not)"
        )
    expected = expected_export_shapes(config)
    # vLLM looks every name up in its own parameters; only embed_tokens may ride along
    problems += tensor_problems(shapes, expected, may_have=("embed_tokens.weight",))
    if {"d2t", "t2d"} <= set(expected) and all(shapes.get(k) == expected[k] for k in ("d2t", "t2d")):
        with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt") as f:
            d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d").bool()
        ids = torch.arange(d2t.shape[0]) + d2t.long()
        in_range = bool(ids.min() >= 0) and bool(ids.max() < t2d.shape[0])
        if not in_range or ids.unique().numel() != ids.numel() or not bool(t2d[ids].all()):
            problems.append(
                f"{WEIGHTS_FILE}: d2t does not map draft ids onto distinct target ids marked in t2d"
            )
        elif int(t2d.sum()) != d2t.shape[0]:
            problems.append(f"{WEIGHTS_FILE}: t2d marks {int(t2d.sum())} tokens, d2t maps {d2t.shape[0]}")
    return problems


SPEC = DraftSpec(
    name=NAME,
    settings=Eagle3Settings,
    architectures=(ARCHITECTURE,),
    needs_teacher=True,
    build=build,
    training_loss=training_loss,
    save=save,
    load=load,
    export=export,
    validate_export=validate_export,
)
