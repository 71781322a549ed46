"""DSpark: the DFlash backbone plus a sequential head, and a confidence head (DeepSeek, DeepSpec).

The DFlash backbone (`dflash.py`) computes the hidden states h_0..h_{B-1} of a whole block in one pass,
and slot k's base logits are the target's LM head applied to h_k. Parallel slots are guessed
independently, so later slots can form incoherent combinations ("suffix decay"). A light sequential
head adds back the dependency on the token chosen at the slot before, x_{k-1} (x_{-1} is the anchor):

    logits_k = lm_head(h_k) + W2 · z_k,   W1: [vocab, r] table of x_{k-1}, W2: r -> vocab, r = 256
    vanilla: z_k = W1[x_{k-1}]                        (a rank-r bigram bias)
    gated:   z_k = sigmoid(G [h_k; W1[x_{k-1}]]) * W1[x_{k-1}]
    rnn:     s_k = g * s_{k-1} + (1 - g) * tanh(c),  z_k = tanh(o),  [g; c; o] = J [s_{k-1}; W1[x_{k-1}]; h_k]

W2 maps the rank-r code straight to vocabulary logits (it does not go through the hidden size). A
confidence head c_k = sigmoid(w · [h_k; W1[x_{k-1}]] + b) estimates the chance that slot k survives
verification given its prefix; it is trained to 1 - TV(p_draft, p_target), and the product
c_0 * ... * c_k estimates that the prefix up to k survives.

Training is teacher-forced: x_{k-1} is the true token (`block_rows(input_ids, ...)`); the backbone
runs once for every packed block (`pack_blocks`). At inference, slots are chosen left to right, each
from logits conditioned on the token chosen before it. `draft_logits` (the `Drafter` protocol) returns
the logits of the argmax chain: exact for greedy speculative decoding, where the verifier drafts each
row's argmax, which is the chain. `propose` samples the chain at a temperature and returns the tokens
with the law q_k each was drawn from; `speculative_generate` uses it whenever a drafter has it, and
its rejection loop verifies whatever the proposal holds. With `confidence_threshold > 0` the proposal
can hold fewer than B tokens (even none, as upstream's evaluator allows).

Early stopping with the confidence head, as upstream's evaluator does (`deepspec/eval/dspark/
draft_ops.py`): with a threshold t > 0 the proposal ends before the first slot whose own c_k < t;
t = 0 keeps the whole block (their default). Upstream records the products c_0..c_k against the
verified prefixes to measure calibration; the paper's load-aware scheduler, which picks each
request's verify length from those products, belongs to a serving engine and is not here.

Teacher: the target's final hidden states through its frozen LM head, capped as the target caps its logits
(a target config's `final_logit_softcapping`: softcap * tanh(logits / softcap)). In training the forward
itself returns the loss (`forward(..., loss_settings=...)`): `losses.chunked_dspark_loss` forms both sides'
logits from the kept slots' states a chunk of rows at a time, reading the LM head and the Markov head's W2
inside the call, where DeepSpeed's ZeRO-3 holds W2 whole.

Targets: the draft layer is upstream's Qwen3 one (`Qwen3DSparkModel`, also for Llama targets). Gemma
targets are refused (`DSparkConfig.from_target`): upstream's and vLLM's `Gemma4DSparkModel` layer is a
different one (sandwich norms, a GELU MLP, attention scale 1.0, a weightless v_norm, k = v sharing, a layer
scalar, scaled embeddings, capped draft logits), which this module does not build; `algo=dflash` serves them.

Serving: vLLM's `qwen3_dspark` (`Qwen3DSparkForCausalLM`) loads the export by these weight names and drafts
in this slot convention (`sample_from_anchor`: the anchor and B - 1 mask tokens as the queries, slot k
drafting token p + k + 1, the Markov head fed the anchor first); it has only the vanilla Markov head, so
`validate_export` refuses the gated and RNN heads (`tests/tasks/test_vllm_dspark_export.py`).

Upstream references: `deepspec/modeling/dspark/qwen3/modeling.py`, `markov_head.py`, `common.py`,
`loss.py`, `qwen3/config.py`, `config/dspark/dspark_qwen3_4b_online.py`. Weight names and `config.json`
keys follow their `Qwen3DSparkModel`, whose `from_pretrained` loads the whole checkpoint, the target's
embedding and LM head included.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepspec.models.drafts.dflash import (
    DFlashConfig,
    DFlashDraft,
    PackedBlocks,
    anchor_blocks,
    block_problems,
)
from deepspec.models.drafts.files import (
    load_weights,
    missing_fields,
    read_config,
    read_export,
    read_weights,
    tensor_problems,
    write_draft_files,
)
from deepspec.models.drafts.spec import DraftInputs, DraftSpec, Samples, Stats
from deepspec.models.errors import ConfigError
from deepspec.models.losses import chunked_dspark_loss, slot_weights, supervised_prefix

NAME = "dspark"
ARCHITECTURE = "Qwen3DSparkModel"
ARCHITECTURES = (ARCHITECTURE,)
GEMMA4_ARCHITECTURE = "Gemma4DSparkModel"  # upstream's Gemma layer, not built here: refused by name
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
SERVED_MARKOV_HEAD_TYPES = ("vanilla",)  # vLLM's DSparkMarkovHead: markov_w1 and markov_w2 only
GEMMA_REFUSAL = (
    "DSpark for Gemma targets needs upstream's Gemma4DSparkModel draft layer (sandwich norms, a GELU MLP, "
    "attention scale 1.0, a weightless v_norm, k = v sharing, a layer scalar), which DeepSpec does not "
    "build yet: its layer is the Qwen3 one, which vLLM's and upstream's Gemma4DSparkModel cannot load. "
    "For a Gemma target use algo=dflash (vLLM serves its Qwen3-style DFlashDraftModel for Gemma targets)"
)
TARGET_WEIGHTS = ("embed_tokens.", "lm_head.")  # the target's, frozen; exported because upstream loads them
INIT_STD = 0.02  # upstream's initializer_range for the new heads (HF `_init_weights`)


def head_problems(heads, prefix: str = "") -> list[str]:
    """What the sequential and confidence heads need of `heads` (DSparkSettings or DSparkConfig): the
    one set of rules, checked when composing (`prefix` "algo.") and when a draft is built or loaded."""
    rank, kind = heads.markov_rank, heads.markov_head_type
    problems = []
    if rank < 0:
        problems.append(f"{prefix}markov_rank={rank}: expected 0 (no head) or a positive rank")
    if rank > 0 and kind not in MARKOV_HEAD_TYPES:
        problems.append(f"{prefix}markov_head_type={kind!r}: expected one of {list(MARKOV_HEAD_TYPES)}")
    if heads.confidence_head and heads.confidence_head_with_markov and rank == 0:
        problems.append(
            f"{prefix}confidence_head_with_markov=true needs a Markov head ({prefix}markov_rank > 0)"
        )
    return problems


@dataclass
class DSparkSettings:
    """`algo=dspark`: the values and their meaning are in conf/algo/dspark.yaml."""

    name: str
    block_size: int
    num_layers: int
    loss_decay: float
    anchors_per_sequence: int
    markov_rank: int
    markov_head_type: str
    confidence_head: bool
    confidence_head_with_markov: bool
    ce_weight: float
    l1_weight: float
    confidence_weight: float

    @property
    def max_draft_tokens(self) -> int:
        """The most tokens a round drafts: every slot of the block (`DSparkDraft.max_draft_tokens`)."""
        return self.block_size

    def problems(self, layer_ids: list[int], num_hidden_layers: int | None) -> list[str]:
        problems = block_problems(self) + head_problems(self, prefix="algo.")
        for key in ("ce_weight", "l1_weight", "confidence_weight"):
            if getattr(self, key) < 0:
                problems.append(f"algo.{key}={getattr(self, key)}: expected a weight of 0 or more")
        return problems


@dataclass
class DSparkConfig:
    backbone: DFlashConfig
    markov_rank: int  # 0: no sequential head, the slots stay parallel
    markov_head_type: str  # one of MARKOV_HEAD_TYPES; unused when markov_rank is 0
    confidence_head: bool
    confidence_head_with_markov: bool  # features [h_k; W1[x_{k-1}]] rather than h_k alone
    num_anchors: int  # anchor blocks per training sequence; upstream's loader requires the key
    # the target's cap on its logits (Gemma: softcap * tanh(logits / softcap)); applied to the teacher
    final_logit_softcapping: float | None = None

    def __post_init__(self) -> None:
        problems = head_problems(self)
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            problems.append(f"final_logit_softcapping={self.final_logit_softcapping}: expected > 0 or null")
        if problems:
            raise ConfigError("DSpark config: " + "; ".join(problems))

    @classmethod
    def from_target(
        cls,
        target_config,
        *,
        num_layers: int,
        block_size: int,
        layer_ids: list[int],
        mask_token_id: int,
        markov_rank: int,
        markov_head_type: str,
        confidence_head: bool,
        confidence_head_with_markov: bool,
        num_anchors: int,
    ) -> DSparkConfig:
        """DFlash's geometry for the target, with q/k norms whatever its family: upstream's DSpark layer
        (`Qwen3DSparkModel`, also for Llama targets) always normalises queries and keys, so the export
        must carry `q_norm`/`k_norm`. The target's logit cap, if any, comes along for the teacher
        (`DSparkDraft.target_logits`). Gemma targets are refused (`GEMMA_REFUSAL`)."""
        text = getattr(target_config, "text_config", None) or target_config
        if str(text.model_type).startswith("gemma"):
            raise ConfigError(f"algo=dspark for a {text.model_type!r} target: {GEMMA_REFUSAL}")
        backbone = DFlashConfig.from_target(
            target_config,
            num_layers=num_layers,
            block_size=block_size,
            layer_ids=layer_ids,
            mask_token_id=mask_token_id,
        )
        softcap = getattr(text, "final_logit_softcapping", None)
        return cls(
            backbone=dataclasses.replace(backbone, qk_norm=True),
            markov_rank=markov_rank,
            markov_head_type=markov_head_type,
            confidence_head=confidence_head,
            confidence_head_with_markov=confidence_head_with_markov,
            num_anchors=num_anchors,
            final_logit_softcapping=float(softcap) if softcap else None,
        )

    def to_hf_dict(self, target_config: dict | None = None) -> dict:
        """`config.json` as upstream's `build_draft_config` writes it: the target's config (when given)
        overlaid with the draft's geometry and the DSpark keys their model classes read."""
        b = self.backbone
        data = dict(target_config or {})
        data.update(
            {
                "architectures": [ARCHITECTURE],
                "model_type": b.target_model_type,
                "hidden_size": b.hidden_size,
                "num_attention_heads": b.num_attention_heads,
                "num_key_value_heads": b.num_key_value_heads,
                "head_dim": b.head_dim,
                "intermediate_size": b.intermediate_size,
                "vocab_size": b.vocab_size,
                "num_hidden_layers": b.num_hidden_layers,
                "num_target_layers": b.target_num_hidden_layers,
                "layer_types": ["full_attention"] * b.num_hidden_layers,
                "rms_norm_eps": b.rms_norm_eps,
                "rope_theta": b.rope_theta,
                "rope_parameters": {"rope_theta": b.rope_theta, "rope_type": "default"},
                "max_position_embeddings": b.max_position_embeddings,
                "hidden_act": "silu",
                "attention_bias": False,
                "tie_word_embeddings": False,
                "block_size": b.block_size,
                "mask_token_id": b.mask_token_id,
                "target_layer_ids": list(b.target_layer_ids),
                "num_anchors": self.num_anchors,
                "markov_rank": self.markov_rank,
                "enable_confidence_head": self.confidence_head,
                "qk_norm": b.qk_norm,  # how our backbone was built, read back by `from_hf_dict`
                # vLLM's DSpark speculator: the anchor and B - 1 mask tokens are the queries and slot k
                # drafts token p + k + 1 (its default; said here so a change of default cannot shift us)
                "sample_from_anchor": True,
            }
        )
        # upstream asserts these keys exist only when the head they describe does
        for key in ("markov_head_type", "confidence_head_with_markov"):
            data.pop(key, None)
        if self.markov_rank > 0:
            data["markov_head_type"] = self.markov_head_type
        if self.confidence_head:
            data["confidence_head_with_markov"] = self.confidence_head_with_markov
        if self.final_logit_softcapping is not None:  # the target config's key, read back
            data["final_logit_softcapping"] = self.final_logit_softcapping
        return data

    @classmethod
    def from_hf_dict(cls, data: dict) -> DSparkConfig:
        architectures = data.get("architectures") or []
        if GEMMA4_ARCHITECTURE in architectures:
            raise ConfigError(f"config.json architectures={architectures}: {GEMMA_REFUSAL}")
        if not set(architectures) & set(ARCHITECTURES):
            raise ConfigError(
                f"config.json architectures={architectures}: expected one of {list(ARCHITECTURES)}"
            )
        needed = (
            "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
            "num_hidden_layers", "block_size", "target_layer_ids", "mask_token_id", "markov_rank",
            "enable_confidence_head", "num_anchors",
        )  # fmt: skip
        missing = [k for k in needed if k not in data]
        if missing:
            raise ConfigError(f"config.json: missing fields {missing}")
        rope = data.get("rope_parameters") or {}
        backbone = DFlashConfig(
            hidden_size=data["hidden_size"],
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data["num_key_value_heads"],
            head_dim=data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"],
            intermediate_size=data["intermediate_size"],
            vocab_size=data["vocab_size"],
            num_hidden_layers=data["num_hidden_layers"],
            block_size=data["block_size"],
            target_layer_ids=list(data["target_layer_ids"]),
            mask_token_id=data["mask_token_id"],
            rms_norm_eps=data.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
            max_position_embeddings=data.get("max_position_embeddings", 32768),
            qk_norm=data.get("qk_norm", True),  # upstream's layers always normalise q and k
            target_model_type=data.get("model_type", "qwen3"),
            target_num_hidden_layers=data.get("num_target_layers", 0),
        )
        return cls(
            backbone=backbone,
            markov_rank=int(data["markov_rank"]),
            markov_head_type=str(data.get("markov_head_type", "vanilla")),
            confidence_head=bool(data["enable_confidence_head"]),
            confidence_head_with_markov=bool(data.get("confidence_head_with_markov", False)),
            num_anchors=int(data["num_anchors"]),
            final_logit_softcapping=data.get("final_logit_softcapping") or None,
        )


class MarkovHead(nn.Module):
    """The sequential head: the code z_k of slot k from x_{k-1} (and h_k, s_{k-1}); bias = W2 z_k.

    One class for upstream's three variants (`VanillaMarkov`, `GatedMarkovHead`, `RNNHead`), with their
    parameter names. `step` is the one definition of a slot; training and inference both call it.
    """

    def __init__(self, kind: str, vocab_size: int, rank: int, hidden_size: int):
        super().__init__()
        self.kind, self.rank = kind, rank
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)
        if kind == "gated":
            self.gate_proj = nn.Linear(hidden_size + rank, rank)
        elif kind == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)  # -> [gate; candidate; output]

    def prev_embedding(self, prev_tokens: torch.Tensor) -> torch.Tensor:
        return self.markov_w1(prev_tokens.long())

    def initial_state(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The RNN state before slot 0 (zeros) for hidden states [..., d]; None for stateless heads."""
        return hidden.new_zeros(*hidden.shape[:-1], self.rank) if self.kind == "rnn" else None

    def step(
        self, hidden: torch.Tensor, prev_tokens: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Code z_k [..., r] and the next state, for hidden h_k [..., d] and tokens x_{k-1} [...]."""
        emb = self.prev_embedding(prev_tokens).to(hidden.dtype)
        if self.kind == "vanilla":
            return emb, state
        if self.kind == "gated":
            return torch.sigmoid(self.gate_proj(torch.cat([hidden, emb], dim=-1))) * emb, state
        gate, candidate, output = self.joint_proj(torch.cat([state, emb, hidden], dim=-1)).chunk(3, dim=-1)
        gate = torch.sigmoid(gate)
        return torch.tanh(output), gate * state + (1.0 - gate) * torch.tanh(candidate)

    def block_codes(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced codes [n, B, r] for hidden [n, B, d] and previous tokens [n, B]."""
        if self.kind != "rnn":  # no state: every slot at once
            return self.step(hidden, prev_tokens, None)[0]
        state, codes = self.initial_state(hidden[:, 0]), []
        for k in range(hidden.shape[1]):
            code, state = self.step(hidden[:, k], prev_tokens[:, k], state)
            codes.append(code)
        return torch.stack(codes, dim=1)

    def bias(self, code: torch.Tensor) -> torch.Tensor:
        return self.markov_w2(code)


class ConfidenceHead(nn.Module):
    """Logit of c_k; upstream's `AcceptRatePredictor` (a linear map with bias to one value)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.proj = nn.Linear(in_features, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)


@dataclass
class DSparkStates:
    """Teacher-forced per-slot outputs of every packed block."""

    hidden: torch.Tensor  # [n_anchors, B, d] final backbone states
    codes: torch.Tensor | None  # [n_anchors, B, r] Markov codes z_k; None without a Markov head
    confidence_logits: torch.Tensor | None  # [n_anchors, B]


@dataclass
class DSparkBatch:
    """The supervised slots of a packed batch, flattened in (anchor, slot) order: the loss's inputs."""

    draft_logits: torch.Tensor  # [M, vocab]
    target_logits: torch.Tensor  # [M, vocab], no gradient
    labels: torch.Tensor  # [M]
    slots: torch.Tensor  # [M] slot index k
    confidence_logits: torch.Tensor | None  # [M]


@dataclass
class DSparkRows:
    """The supervised slots of a packed batch before the vocabulary, flattened in (anchor, slot) order:
    the inputs of `losses.chunked_dspark_loss`, which forms both sides' logits a chunk of rows at a time
    (draft logits = lm_head(hidden) + markov_w2(codes))."""

    hidden: torch.Tensor  # [M, d] final backbone states
    codes: torch.Tensor | None  # [M, r] Markov codes z_k; None without a Markov head
    target_hidden: torch.Tensor | None  # [M, d] the target's final states (no gradient), or
    target_logits: torch.Tensor | None  # [M, vocab] its logits (no gradient)
    labels: torch.Tensor  # [M]
    slots: torch.Tensor  # [M] slot index k
    confidence_logits: torch.Tensor | None  # [M]


@dataclass
class DSparkProposal:
    """A drafted chain x_0..x_{L-1} after the anchor (L <= block size)."""

    tokens: list[int]
    probs: torch.Tensor  # [L, vocab] float32 on the draft's device: the law q_k each token was drawn from
    logits: torch.Tensor  # [L, vocab] float32: logits of the chain, before the temperature
    confidence: torch.Tensor | None  # [L] c_k = sigmoid(confidence logit); prefix survival = cumprod


def block_rows(values: torch.Tensor, anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """values[p + k] for each anchor p and slot k (clamped to the last row): [n_anchors, B, ...].

    With `input_ids` these are the teacher-forced previous tokens x_{k-1} of every slot (slot 0: the
    anchor); with the target's final hidden states, the rows whose LM-head logits are the target's law
    of slot k's label (token p + k + 1). Slots past the end are clamped; their labels are ignored.
    """
    index = (anchors[:, None] + torch.arange(block_size, device=anchors.device)[None, :]).clamp(
        max=values.shape[0] - 1
    )
    return values[index.to(values.device)]


class DSparkDraft(nn.Module):
    def __init__(self, cfg: DSparkConfig, embed_weight: torch.Tensor, head_weight: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.block_size = cfg.backbone.block_size
        self.num_draft_tokens = self.block_size  # slot k drafts the token at p + k + 1, anchor slot included
        self.max_draft_tokens: int | None = self.block_size  # `set_num_draft_tokens` keeps within it
        # The DFlash backbone holds the frozen target embedding and LM head.
        self.backbone = DFlashDraft(cfg.backbone, embed_weight, head_weight)
        d, vocab = cfg.backbone.hidden_size, cfg.backbone.vocab_size
        self.markov_head = (
            MarkovHead(cfg.markov_head_type, vocab, cfg.markov_rank, d) if cfg.markov_rank > 0 else None
        )
        self.confidence_head = None
        if cfg.confidence_head:
            self.confidence_head = ConfidenceHead(
                d + (cfg.markov_rank if cfg.confidence_head_with_markov else 0)
            )
        for head in (self.markov_head, self.confidence_head):
            if head is not None:
                head.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # --- names on disk: upstream's (no `backbone.` prefix) ---

    def export_state_dict(self, include_target_weights: bool) -> dict[str, torch.Tensor]:
        state = {k.removeprefix("backbone."): v for k, v in self.state_dict().items()}
        if include_target_weights:
            return state
        return {k: v for k, v in state.items() if not k.startswith(TARGET_WEIGHTS)}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.export_state_dict(include_target_weights=False)

    # --- training (teacher-forced) ---

    def _confidence_logits(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor | None:
        if self.confidence_head is None:
            return None
        features = hidden
        if self.cfg.confidence_head_with_markov:
            # upstream feeds W1[x_{k-1}] itself here, also for the gated and RNN heads
            features = torch.cat([hidden, self.markov_head.prev_embedding(prev_tokens).to(hidden.dtype)], -1)
        return self.confidence_head(features).float()

    def block_states(self, packed: PackedBlocks, prev_tokens: torch.Tensor) -> DSparkStates:
        """Backbone states, Markov codes and confidence logits of every packed block.

        prev_tokens [n_anchors, B]: x_{k-1} of each slot, the true tokens (`block_rows(input_ids, ...)`).
        """
        n, b = prev_tokens.shape
        hidden = self.backbone.hidden(packed).view(n, b, -1)
        prev_tokens = prev_tokens.to(hidden.device)
        codes = None if self.markov_head is None else self.markov_head.block_codes(hidden, prev_tokens)
        return DSparkStates(hidden, codes, self._confidence_logits(hidden, prev_tokens))

    def slot_logits(self, states: DSparkStates, index: torch.Tensor | None = None) -> torch.Tensor:
        """Draft logits of the slots at flat (anchor * B + slot) positions `index` (all when None)."""
        hidden = states.hidden.reshape(-1, states.hidden.shape[-1])
        hidden = hidden if index is None else hidden[index]
        logits = self.backbone.lm_head(hidden)
        if states.codes is not None:
            codes = states.codes.reshape(-1, states.codes.shape[-1])
            logits = logits + self.markov_head.bias(codes if index is None else codes[index])
        return logits

    @torch.no_grad()
    def target_logits(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """The target's logits from its final (normalised) hidden states, with its frozen LM head, capped
        as the target caps them (Gemma: softcap * tanh(logits / softcap), `final_logit_softcapping`)."""
        logits = self.backbone.lm_head(final_hidden.to(self.backbone.lm_head.weight.dtype))
        softcap = self.cfg.final_logit_softcapping
        return logits if softcap is None else torch.tanh(logits / softcap) * softcap

    def forward(
        self,
        packed: PackedBlocks,
        prev_tokens: torch.Tensor,
        labels: torch.Tensor,
        *,
        target_hidden: torch.Tensor | None = None,
        target_logits: torch.Tensor | None = None,
        chunked: bool = False,
        loss_settings: DSparkSettings | None = None,
    ) -> DSparkBatch | DSparkRows | tuple[torch.Tensor, Stats]:
        """The supervised slots' draft logits, teacher logits, labels and confidence logits.

        labels [n_anchors, B] (`block_labels`); only each block's supervised prefix is kept. The teacher
        is either `target_hidden` [n_anchors, B, d], the target's final hidden state at p + k
        (`block_rows(final_hidden, ...)`; the frozen LM head runs only on the kept slots, the cheap
        choice for a 150k vocabulary), or `target_logits` [n_anchors, B, vocab]. With `chunked`, the
        kept slots' states instead of any logits (`DSparkRows`, for `losses.chunked_dspark_loss`). With
        `loss_settings`, the training loss and statistics of those rows (`chunked_loss`).
        """
        if (target_hidden is None) == (target_logits is None):
            raise ValueError("pass exactly one of target_hidden and target_logits")
        states = self.block_states(packed, prev_tokens)
        labels = labels.to(states.hidden.device)
        index = supervised_prefix(labels).reshape(-1).nonzero().squeeze(-1)
        confidence = states.confidence_logits
        confidence = None if confidence is None else confidence.reshape(-1)[index]
        if chunked or loss_settings is not None:
            device = states.hidden.device

            def kept(x: torch.Tensor | None) -> torch.Tensor | None:
                return None if x is None else x.reshape(-1, x.shape[-1])[index.to(x.device)].to(device)

            rows = DSparkRows(
                hidden=kept(states.hidden),
                codes=kept(states.codes),
                target_hidden=None if target_hidden is None else kept(target_hidden).detach(),
                target_logits=None if target_logits is None else kept(target_logits).detach(),
                labels=labels.reshape(-1)[index],
                slots=index % self.block_size,
                confidence_logits=confidence,
            )
            return rows if loss_settings is None else self.chunked_loss(rows, loss_settings)
        if target_hidden is not None:
            rows = target_hidden.reshape(-1, target_hidden.shape[-1])
            teacher = self.target_logits(rows[index.to(rows.device)])
        else:
            rows = target_logits.reshape(-1, target_logits.shape[-1])
            teacher = rows[index.to(rows.device)].detach()
        return DSparkBatch(
            draft_logits=self.slot_logits(states, index),
            target_logits=teacher.to(states.hidden.device),
            labels=labels.reshape(-1)[index],
            slots=index % self.block_size,
            confidence_logits=confidence,
        )

    def chunked_loss(self, rows: DSparkRows, settings: DSparkSettings) -> tuple[torch.Tensor, Stats]:
        """ce_weight CE + l1_weight L1 + confidence_weight BCE of the kept rows, slot k weighted
        exp(-k / loss_decay): the frozen head (capped as the target caps it) and W2 applied to a chunk of
        rows at a time, on both sides."""
        markov = None if rows.codes is None else (rows.codes, self.markov_head.markov_w2.weight)
        return chunked_dspark_loss(
            rows.hidden, self.backbone.lm_head.weight, rows.labels, rows.slots, rows.confidence_logits,
            slot_weights(self.block_size, settings.loss_decay, device=rows.hidden.device),
            target_hidden=rows.target_hidden, target_logits=rows.target_logits, markov=markov,
            target_softcap=self.cfg.final_logit_softcapping, ce_weight=settings.ce_weight,
            l1_weight=settings.l1_weight, confidence_weight=settings.confidence_weight,
        )  # fmt: skip

    # --- inference (left to right) ---

    def _block_hidden(self, context_features: torch.Tensor, anchor_token: int) -> torch.Tensor:
        """Backbone states [n, d] of the block anchored right after the context: n = `num_draft_tokens`
        slots (B unless set lower), every one drafting, as vLLM's DSpark proposer runs n speculative
        tokens (the anchor and n - 1 masks)."""
        return self.backbone.block_hidden(context_features, anchor_token, slots=self.num_draft_tokens)

    def decoding(self) -> AbstractContextManager[None]:
        """The backbone's decode cache (`DFlashDraft.decoding`): the heads keep no context of their own."""
        return self.backbone.decoding()

    @torch.no_grad()
    def propose(
        self,
        context_features: torch.Tensor,
        anchor_token: int,
        *,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        confidence_threshold: float = 0.0,
    ) -> DSparkProposal:
        """Draft the block (`num_draft_tokens` slots, B unless set lower) slot by slot: each slot's logits
        use the token chosen at the slot before.

        Tokens are the argmax at temperature 0, else drawn from softmax(logits / temperature) with
        `generator` (on the draft's device). With a confidence head and `confidence_threshold` > 0, the
        proposal ends before the first slot whose c_k falls below it (c_k depends only on h_k and
        x_{k-1}, so cutting there changes nothing before it). Every slot stays on the device until the
        block is drafted: then one host transfer for the tokens and one for the confidences.
        """
        hidden = self._block_hidden(context_features, anchor_token)  # [B, d]
        base = self.backbone.lm_head(hidden)
        prev = torch.tensor(int(anchor_token), device=hidden.device)
        state = None if self.markov_head is None else self.markov_head.initial_state(hidden[0])
        tokens, rows, confidence = [], [], []
        for k in range(self.num_draft_tokens):
            c = self._confidence_logits(hidden[k], prev)
            if c is not None:
                confidence.append(torch.sigmoid(c).reshape(()))
            row = base[k]
            if self.markov_head is not None:
                code, state = self.markov_head.step(hidden[k], prev, state)
                row = row + self.markov_head.bias(code)
            row = row.float()
            if temperature == 0:
                prev = row.argmax()
            else:
                prev = torch.multinomial(torch.softmax(row / temperature, -1), 1, generator=generator)[0]
            tokens.append(prev)
            rows.append(row)
        token_list = torch.stack(tokens).tolist()
        head = torch.stack(confidence).float().cpu() if confidence else None
        n = len(token_list)
        if head is not None and confidence_threshold > 0:
            below = (head < confidence_threshold).nonzero()
            n = int(below[0]) if len(below) else n
        logits = torch.stack(rows[:n]) if n else base.new_empty(0, base.shape[-1]).float()
        if temperature == 0:
            probs = (
                torch.nn.functional.one_hot(torch.stack(tokens[:n]), base.shape[-1]).float() if n else logits
            )
        else:
            probs = torch.softmax(logits / temperature, -1)
        return DSparkProposal(
            tokens=token_list[:n], probs=probs, logits=logits, confidence=None if head is None else head[:n]
        )

    @torch.no_grad()
    def draft_logits(self, context_features: torch.Tensor, anchor_token: int) -> torch.Tensor:
        """Logits [B, vocab] of the argmax chain (the `Drafter` protocol of `models/speculative.py`)."""
        return self.propose(context_features, anchor_token, temperature=0.0).logits


# ----------------------------------------------------------------------------------------------------
# Building and training


def build(settings: DSparkSettings, inputs: DraftInputs) -> DSparkDraft:
    """q/k norms for every target family and the target's logit cap come with the config."""
    cfg = DSparkConfig.from_target(
        inputs.target_config,
        num_layers=settings.num_layers,
        block_size=settings.block_size,
        layer_ids=inputs.layer_ids,
        mask_token_id=inputs.mask_token_id,
        markov_rank=settings.markov_rank,
        markov_head_type=settings.markov_head_type,
        confidence_head=settings.confidence_head,
        confidence_head_with_markov=settings.confidence_head_with_markov,
        num_anchors=settings.anchors_per_sequence,
    )
    return DSparkDraft(cfg, inputs.embed, inputs.head)


def training_loss(
    forward, model: DSparkDraft, samples: Samples, settings: DSparkSettings, teacher, generator
) -> tuple[torch.Tensor, Stats]:
    """DFlash's blocks plus each slot's previous token, against the target's distribution:
    ce_weight CE + l1_weight L1 + confidence_weight BCE, slot k weighted exp(-k / loss_decay)."""
    device = model.backbone.fc.weight.device
    block = model.block_size
    anchors, packed, labels = anchor_blocks(
        samples, settings.anchors_per_sequence, block, model.cfg.backbone.mask_token_id, generator, device
    )
    pairs = list(zip(samples, anchors, strict=True))
    prev = torch.cat([block_rows(s["input_ids"], a, block) for s, a in pairs])
    final = torch.cat([block_rows(teacher.final_hidden(s), a, block) for s, a in pairs])
    # the loss inside the call (`chunked_loss`): it reads W2 (trained), which ZeRO-3 holds whole only there
    return forward(packed, prev.to(device), labels, target_hidden=final, loss_settings=settings)


# ----------------------------------------------------------------------------------------------------
# Files


def _write(
    model: DSparkDraft, out_dir: Path, include_target_weights: bool, target_config: dict | None
) -> None:
    config = model.cfg.to_hf_dict(target_config)
    config["dtype"] = str(model.backbone.fc.weight.dtype).removeprefix("torch.")
    write_draft_files(out_dir, config, model.export_state_dict(include_target_weights))


def save(model: DSparkDraft, out_dir: Path) -> None:
    """Training output: `config.json` and the draft's own weights (`load` takes the target's from it)."""
    _write(model, out_dir, include_target_weights=False, target_config=None)


def export(model: DSparkDraft, out_dir: Path, target_config) -> str:
    """`Qwen3DSparkModel` as upstream's `from_pretrained` and vLLM's `qwen3_dspark` load it: the target's
    `config.json` overlaid with the draft's (upstream builds it so), and the target's embedding and LM
    head in the weights, which upstream's loader would otherwise leave at random values."""
    _write(model, out_dir, include_target_weights=True, target_config=target_config.to_dict())
    return ARCHITECTURE


def load(draft_dir: Path, embed_weight: torch.Tensor, head_weight: torch.Tensor) -> DSparkDraft:
    """A saved draft or export; the target's embedding and LM head always come from the arguments."""
    model = DSparkDraft(DSparkConfig.from_hf_dict(read_config(draft_dir)), embed_weight, head_weight)
    own = {k: v for k, v in read_weights(draft_dir).items() if not k.startswith(TARGET_WEIGHTS)}
    renamed = {
        k if k.startswith(("markov_head.", "confidence_head.")) else f"backbone.{k}": v
        for k, v in own.items()
    }
    return load_weights(model, renamed, draft_dir, shared=[f"backbone.{k}" for k in TARGET_WEIGHTS])


def expected_weights(config: dict) -> dict[str, tuple[int, ...] | None]:
    """Tensor names (and, where cheap to state, shapes) that upstream's `Qwen3DSparkModel` creates and
    `from_pretrained` must find."""
    d, vocab, rank = (
        config.get("hidden_size", 0),
        config.get("vocab_size", 0),
        int(config.get("markov_rank", 0)),
    )
    n_features = len(config.get("target_layer_ids", []))
    names: dict[str, tuple[int, ...] | None] = {
        "embed_tokens.weight": (vocab, d),
        "lm_head.weight": (vocab, d),
        "fc.weight": (d, n_features * d),
        "hidden_norm.weight": (d,),
        "norm.weight": (d,),
    }
    projections = ["q_proj", "k_proj", "v_proj", "o_proj"]
    norms = ["input_layernorm", "post_attention_layernorm"]
    for i in range(int(config.get("num_hidden_layers", 0))):
        names |= {f"layers.{i}.self_attn.{p}.weight": None for p in projections}
        names |= {f"layers.{i}.self_attn.{p}.weight": None for p in ("q_norm", "k_norm")}
        names |= {f"layers.{i}.mlp.{p}.weight": None for p in ("gate_proj", "up_proj", "down_proj")}
        names |= {f"layers.{i}.{p}.weight": (d,) for p in norms}
    if rank > 0:
        names["markov_head.markov_w1.weight"] = (vocab, rank)
        names["markov_head.markov_w2.weight"] = (vocab, rank)
        kind = config.get("markov_head_type")
        if kind == "gated":
            names |= {"markov_head.gate_proj.weight": (rank, d + rank), "markov_head.gate_proj.bias": (rank,)}
        elif kind == "rnn":
            names["markov_head.joint_proj.weight"] = (3 * rank, 2 * rank + d)
            names["markov_head.joint_proj.bias"] = (3 * rank,)
    if config.get("enable_confidence_head"):
        width = d + (rank if config.get("confidence_head_with_markov") else 0)
        names |= {"confidence_head.proj.weight": (1, width), "confidence_head.proj.bias": (1,)}
    return names


def validate_export(path: Path) -> list[str]:
    """Problems that would stop upstream's `Qwen3DSparkModel.from_pretrained` or vLLM's `qwen3_dspark`
    from loading the draft at `path` as trained, or would make vLLM draft it otherwise; empty when it
    loads. Upstream's loader asserts the DSpark keys and silently re-initialises missing tensors; vLLM
    has only the vanilla Markov head and refuses the others' weights."""
    config, shapes, problems = read_export(path)
    if config is None:
        return problems
    architectures = config.get("architectures")
    if (
        not isinstance(architectures, list)
        or len(architectures) != 1
        or architectures[0] not in ARCHITECTURES
    ):
        problems.append(f"config.json: architectures={architectures}, expected one of {list(ARCHITECTURES)}")
    required = [
        "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
        "num_hidden_layers", "rms_norm_eps", "block_size", "target_layer_ids", "mask_token_id", "num_anchors",
        "enable_confidence_head", "markov_rank",
        "layer_types",  # Qwen3 attention indexes it per layer
    ]  # fmt: skip
    problems += missing_fields(config, required)
    rank = config.get("markov_rank", 0)
    if not isinstance(rank, int) or rank < 0:
        problems.append(f"config.json: markov_rank={rank!r}, expected an integer >= 0")
        rank = 0
    kind = config.get("markov_head_type")
    if rank > 0 and kind not in MARKOV_HEAD_TYPES:
        problems.append(f"config.json: markov_head_type={kind!r}, expected one of {MARKOV_HEAD_TYPES}")
    elif rank > 0 and kind not in SERVED_MARKOV_HEAD_TYPES:
        problems.append(
            f"config.json: markov_head_type={kind!r}: vLLM's Qwen3DSparkModel has only the vanilla Markov "
            "head (markov_w1, markov_w2) and refuses this head's other weights; upstream DeepSpec loads it, "
            "but to serve a draft train it with algo.markov_head_type=vanilla"
        )
    if config.get("sample_from_anchor", True) is not True:  # vLLM's default when absent
        problems.append(
            f"config.json: sample_from_anchor={config['sample_from_anchor']!r}: vLLM would then draft from "
            "the mask slots only (the anchor a bonus token); this draft's slot k, the anchor's included, "
            "drafts token p + k + 1"
        )
    if config.get("enable_confidence_head"):
        problems += missing_fields(config, ["confidence_head_with_markov"], " (confidence head enabled)")
        if config.get("confidence_head_with_markov") and rank == 0:
            problems.append("config.json: confidence_head_with_markov=true needs markov_rank > 0")
    n_layers = config.get("num_hidden_layers")
    if "layer_types" in config and len(config["layer_types"]) != n_layers:
        problems.append(f"config.json: {len(config['layer_types'])} layer_types for {n_layers} layers")
    layer_ids, n_target = config.get("target_layer_ids") or [], config.get("num_target_layers")
    if layer_ids and (
        any(b <= a for a, b in zip(layer_ids, layer_ids[1:], strict=False)) or layer_ids[0] < -1
    ):
        problems.append(f"config.json: target_layer_ids={layer_ids} must increase strictly, from -1 up")
    if layer_ids and n_target and layer_ids[-1] >= n_target:
        problems.append(f"config.json: target_layer_ids={layer_ids} exceed num_target_layers={n_target}")
    problems += tensor_problems(shapes, expected_weights(config))
    return problems


SPEC = DraftSpec(
    name=NAME,
    settings=DSparkSettings,
    architectures=ARCHITECTURES,
    needs_teacher=True,
    build=build,
    training_loss=training_loss,
    save=save,
    load=load,
    export=export,
    validate_export=validate_export,
)
