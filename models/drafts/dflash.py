"""DFlash: a block-diffusion drafter (arXiv 2602.06036).

The draft sees a block of `block_size` slots at positions p..p+B-1: the anchor token x_p (the last token
the target committed, whose own features are not computed yet) followed by B-1 mask tokens, and drafts
B-1 tokens in one forward pass. The target's features of the context (the residual stream after chosen
target layers, concatenated, projected by `fc` and normalised) are injected as extra keys and values in
every draft layer: a slot attends to the whole block bidirectionally and to context positions strictly
before its anchor.

Slot convention: mask slot k (k = 1..B-1, at position p+k) predicts the token at its own position, x_{p+k};
the anchor slot predicts nothing. This is the convention of the engines' `DFlashDraftModel`, the class
this draft exports as: vLLM's DFlash proposer (`v1/spec_decode/dflash.py` and its input kernel
`copy_and_expand_dflash_inputs` in `utils.py`) feeds [bonus, mask, ..., mask] and samples draft j from
query slot j, skipping the bonus slot. Upstream DeepSpec's DFlash is its DSpark model with the
sequential head off, where slot k predicts x_{p+k+1} and the anchor slot drafts too; that convention
lives in `dspark.py` (`algo=dspark`), exported as `Qwen3DSparkModel`, which vLLM's `qwen3_dspark` reads
(with a sequential head: vLLM's CPU build cannot even post-process a zero-width one). A draft trained in
one convention and served in the other gets almost nothing accepted, so the two are separate
algorithms, each exported to the model class that reads it. `tests/tasks/test_vllm_exports.py` serves
the DFlash export with vLLM and checks that vLLM accepts what `speculative_generate` measures, and that
DeepSpec reading the slots shifted by one measures what vLLM does not reproduce.

Training packs many anchor blocks of many sequences into one pass (`pack_blocks`). Who may attend to
whom is kept as token-level index vectors (sequence, position, anchor, block of every row), and attention
runs in chunks of queries, each given only the keys it can see and the mask over those, so no
[all queries x all keys] matrix is formed; the same code path serves inference (one block).

The draft shares the target's width and reuses its input embedding and LM head, frozen; only `fc`,
`hidden_norm`, the decoder layers and the final `norm` are trained and saved. Weight names follow the
released DFlash checkpoints (`fc`, `hidden_norm`, `layers.N.self_attn.q_proj`, ..., `norm`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deepspec.models.drafts.files import (
    load_weights,
    missing_fields,
    read_config,
    read_export,
    read_weights,
    tensor_problems,
    write_draft_files,
)
from deepspec.models.drafts.kv_cache import DecodeCache, GrowingKV, decode_session
from deepspec.models.drafts.layers import MLP, GroupedQueryProjections, RMSNorm, apply_rotary, rotary
from deepspec.models.drafts.spec import DraftInputs, DraftSpec, Samples, Stats
from deepspec.models.errors import ConfigError
from deepspec.models.losses import block_labels, slot_weights, weighted_block_cross_entropy

NAME = "dflash"
ARCHITECTURE = "DFlashDraftModel"
ATTENTION_CHUNK_ROWS = 1024  # block rows (queries) per attention call in training; rounded to whole blocks
SHARED = ("embed_tokens.", "lm_head.")  # the target's embedding and LM head: never saved with the draft


@dataclass
class DFlashSettings:
    """`algo=dflash`: the values and their meaning are in conf/algo/dflash.yaml."""

    name: str
    block_size: int
    num_layers: int
    loss_decay: float
    anchors_per_sequence: int

    @property
    def max_draft_tokens(self) -> int:
        """The most tokens a round drafts: mask slots 1..B-1 (`DFlashDraft.max_draft_tokens`)."""
        return self.block_size - 1

    def problems(self, layer_ids: list[int], num_hidden_layers: int | None) -> list[str]:
        problems = block_problems(self)
        if self.block_size < 2:
            problems.append(
                f"algo.block_size={self.block_size}: DFlash needs at least 2 slots "
                "(the anchor drafts nothing; mask slots 1..B-1 draft one token each)"
            )
        return problems


def block_problems(settings) -> list[str]:
    """What DFlash and DSpark, which share the block backbone, need of their settings."""
    checks = [
        (settings.block_size >= 1, f"algo.block_size={settings.block_size}: expected at least 1"),
        (settings.num_layers >= 1, f"algo.num_layers={settings.num_layers}: expected at least 1"),
        (settings.loss_decay > 0, f"algo.loss_decay={settings.loss_decay}: expected a positive decay"),
        (
            settings.anchors_per_sequence >= 1,
            f"algo.anchors_per_sequence={settings.anchors_per_sequence}: expected at least 1",
        ),
    ]
    return [message for ok, message in checks if not ok]


@dataclass
class DFlashConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_hidden_layers: int
    block_size: int
    target_layer_ids: list[int]
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    # The engines' DFlash layer (vLLM's `DFlashQwen3Attention`) always normalises queries and keys; False
    # only in drafts saved before DeepSpec matched it, which load but do not serve as trained.
    qk_norm: bool = True
    # DSpark, which builds on this backbone, also keeps how the target embeds and what it is: Gemma
    # scales embeddings by sqrt(hidden_size). The engines' DFlash embeds without a scale.
    embed_scale: float = 1.0
    target_model_type: str = "llama"
    target_num_hidden_layers: int = 0

    @classmethod
    def from_target(
        cls, target_config, *, num_layers: int, block_size: int, layer_ids: list[int], mask_token_id: int
    ) -> DFlashConfig:
        """Draft geometry from the target's config: same width, heads and MLP as one target layer, in the
        engines' Qwen3-style DFlash layer (q/k norms) whatever the target's family."""
        text = getattr(target_config, "text_config", None) or target_config
        heads = text.num_attention_heads
        rope = getattr(text, "rope_parameters", None) or {}
        model_type = text.model_type
        return cls(
            hidden_size=text.hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate_size=text.intermediate_size,
            vocab_size=text.vocab_size,
            num_hidden_layers=num_layers,
            block_size=block_size,
            target_layer_ids=list(layer_ids),
            mask_token_id=mask_token_id,
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))),
            max_position_embeddings=getattr(text, "max_position_embeddings", None) or 32768,
            target_model_type=model_type,
            target_num_hidden_layers=text.num_hidden_layers,
        )

    @property
    def num_target_features(self) -> int:
        return len(self.target_layer_ids)

    def to_hf_dict(self) -> dict:
        """The `config.json` the engines' `DFlashDraftModel` reads: a Qwen3 config (the draft layer's
        family, whatever the target's) with `block_size` and `dflash_config` (`mask_token_id`,
        `target_layer_ids`), and nothing they do not read."""
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "qwen3",
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "num_hidden_layers": self.num_hidden_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "tie_word_embeddings": False,
            "block_size": self.block_size,
            "dflash_config": {"mask_token_id": self.mask_token_id, "target_layer_ids": self.target_layer_ids},
        }

    @classmethod
    def from_hf_dict(cls, data: dict) -> DFlashConfig:
        if ARCHITECTURE not in data.get("architectures", []):
            raise ConfigError(
                f"config.json architectures={data.get('architectures')}: expected {ARCHITECTURE}"
            )
        names = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in names}
        values.update({k: v for k, v in data.get("dflash_config", {}).items() if k in names})
        rope = data.get("rope_parameters") or {}
        if "rope_theta" in rope:
            values["rope_theta"] = float(rope["rope_theta"])
        return cls(**values)


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: list[AttentionChunk], n_c: int
) -> torch.Tensor:
    """Packed blocks' attention, one SDPA call per chunk of queries on the keys that chunk can see:
    q [H, n_q, hd], k and v [Hkv, n_c + n_q, hd] (context keys, then block keys) -> [H, n_q, hd]."""
    outputs = []
    for chunk in chunks:
        c, b = chunk.context, chunk.blocks
        if c.stop - c.start == n_c and b.stop - b.start == q.shape[1]:
            k_chunk, v_chunk = k, v  # every key: no copy
        else:
            k_chunk = torch.cat([k[:, c], k[:, n_c + b.start : n_c + b.stop]], dim=1)
            v_chunk = torch.cat([v[:, c], v[:, n_c + b.start : n_c + b.stop]], dim=1)
        out = F.scaled_dot_product_attention(
            q[None, :, chunk.queries], k_chunk[None], v_chunk[None], attn_mask=chunk.mask, enable_gqa=True
        )
        outputs.append(out[0])
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


class DFlashAttention(GroupedQueryProjections):
    """Block queries over the context's projected features and the block itself, as keys and values."""

    def __init__(self, cfg: DFlashConfig):
        super().__init__(
            cfg.hidden_size,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            qk_norm=cfg.qk_norm,
            eps=cfg.rms_norm_eps,
        )

    def forward(
        self,
        block: torch.Tensor,  # [n_q, d] normalised block hidden states
        context: torch.Tensor,  # [n_c, d] projected target features
        block_rope: tuple[torch.Tensor, torch.Tensor],
        context_rope: tuple[torch.Tensor, torch.Tensor],
        chunks: list[AttentionChunk],
    ) -> torch.Tensor:
        q = apply_rotary(self.queries(block), *block_rope)
        k, v = self.keys_values(torch.cat([context, block], dim=0))
        k = apply_rotary(
            k, torch.cat([context_rope[0], block_rope[0]]), torch.cat([context_rope[1], block_rope[1]])
        )
        return self.output(chunked_attention(q, k, v, chunks, context.shape[0]))

    def decode(
        self, block: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: GrowingKV
    ) -> torch.Tensor:
        """One block at inference over the cached context keys: the block sees every context position
        and all of itself, so no mask is needed."""
        q = apply_rotary(self.queries(block), *rope)
        k, v = self.keys_values(block)
        keys, values = cache.with_scratch(apply_rotary(k, *rope), v)
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None], enable_gqa=True)
        return self.output(out[0])


class DFlashLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DFlashAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, context, block_rope, context_rope, chunks):
        x = x + self.self_attn(self.input_layernorm(x), context, block_rope, context_rope, chunks)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, rope, cache: GrowingKV):
        x = x + self.self_attn.decode(self.input_layernorm(x), rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class PackedBlocks:
    """Many anchor blocks from many sequences, flattened for one attention pass per layer.

    Context rows are the target features of every position of every sequence; block rows are
    `block_size` slots per anchor. Who may attend to whom is held as token-level index vectors, never as
    a [queries x keys] matrix: block row i may attend to

    - context row j  iff  block_sequence[i] == context_sequence[j] and context_positions[j] < block_anchor[i]
    - block row j    iff  block_index[i] == block_index[j]  (the whole block, both ways)

    `attention_mask` evaluates that rule for a range of rows; the draft builds it one chunk of queries at a
    time (`attention_chunks`). Every field is a tensor, so `PackedBlocks(**{f: t.to(device) ...})` works.
    """

    context_features: torch.Tensor  # [n_c, L*d]
    context_positions: torch.Tensor  # [n_c]
    context_sequence: torch.Tensor  # [n_c] sequence of each context row
    block_ids: torch.Tensor  # [n_q] anchor token, then mask tokens
    block_positions: torch.Tensor  # [n_q] RoPE position: anchor + slot
    block_sequence: torch.Tensor  # [n_q] sequence of each block row
    block_anchor: torch.Tensor  # [n_q] anchor of the row's block: it sees context positions before it
    block_index: torch.Tensor  # [n_q] which block the row belongs to

    def to(self, device) -> PackedBlocks:
        return PackedBlocks(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def attention_mask(
        self, rows: slice = slice(None), context: slice = slice(None), blocks: slice = slice(None)
    ) -> torch.Tensor:
        """[rows, context keys + block keys] bool, True = may attend, for block rows `rows` against the
        context rows `context` followed by the block rows `blocks` (all of them by default)."""
        seq, anchor, index = self.block_sequence[rows], self.block_anchor[rows], self.block_index[rows]
        sees_context = (seq[:, None] == self.context_sequence[None, context]) & (
            self.context_positions[None, context] < anchor[:, None]
        )
        sees_block = index[:, None] == self.block_index[None, blocks]
        return torch.cat([sees_context, sees_block], dim=1)


def pack_blocks(
    sequences: list[tuple[torch.Tensor, torch.Tensor]],
    anchors: list[torch.Tensor],
    block_size: int,
    mask_token_id: int,
) -> PackedBlocks:
    """sequences: (input_ids [T], features [T, L*d]) each; anchors: anchor positions per sequence.

    Rows come out grouped by sequence, context rows in position order and block rows block by block,
    the order `attention_chunks` uses to give each chunk of queries only the keys it can see.
    """
    ctx_pos, ctx_seq, blk_anchor, blk_seq = [], [], [], []
    for s, ((ids, _), anchor_pos) in enumerate(zip(sequences, anchors, strict=True)):
        ctx_pos.append(torch.arange(ids.shape[0]))
        ctx_seq.append(torch.full((ids.shape[0],), s))
        blk_anchor.append(anchor_pos.long().cpu())
        blk_seq.append(torch.full((anchor_pos.numel(),), s))
    anchor_t, seq_t = torch.cat(blk_anchor), torch.cat(blk_seq)  # one entry per block
    offsets = torch.cumsum(torch.tensor([0] + [ids.shape[0] for ids, _ in sequences[:-1]]), 0)
    anchor_tokens = torch.cat([ids.cpu() for ids, _ in sequences])[offsets[seq_t] + anchor_t]
    tokens = torch.full((anchor_t.numel(), block_size), mask_token_id, dtype=torch.long)
    tokens[:, 0] = anchor_tokens
    slots = torch.arange(block_size)
    return PackedBlocks(
        context_features=torch.cat([features for _, features in sequences]),
        context_positions=torch.cat(ctx_pos),
        context_sequence=torch.cat(ctx_seq),
        block_ids=tokens.reshape(-1),
        block_positions=(anchor_t[:, None] + slots[None, :]).reshape(-1),
        block_sequence=seq_t.repeat_interleave(block_size),
        block_anchor=anchor_t.repeat_interleave(block_size),
        block_index=torch.arange(anchor_t.numel()).repeat_interleave(block_size),
    )


def sample_anchors(loss_mask: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Up to `count` anchor positions, sorted, drawn without replacement with `generator` among the
    positions p where token p is supervised (an assistant token) and so is token p + 1 (slot 0's label).

    This is upstream's candidate rule (`build_anchor_candidate_mask`: loss_mask[p] & loss_mask[p + 1]).
    A sequence without a candidate gets one dummy anchor at its last position: its slots lie past the
    end, so all its labels are ignored, and every rank still runs the same forward/backward sequence.
    """
    mask = loss_mask.bool().cpu()
    candidates = torch.nonzero(mask[:-1] & mask[1:]).flatten()
    if candidates.numel() == 0:
        return torch.tensor([max(mask.shape[0] - 1, 0)])
    if candidates.numel() > count:
        candidates = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
    return candidates.sort().values


@dataclass
class AttentionChunk:
    """A range of block rows (queries), the context and block rows it may see, and its mask over them."""

    queries: slice
    context: slice
    blocks: slice
    mask: torch.Tensor  # [queries, context + blocks] bool


def attention_chunks(packed: PackedBlocks, chunk_rows: int | None) -> list[AttentionChunk]:
    """Split the block rows into chunks of at most `chunk_rows` queries (None: one chunk, every key).

    When rows are in `pack_blocks`'s order, a chunk's keys are narrowed to the context rows of its
    sequences up to its last anchor and to the rows of its own blocks, so that masks scale with
    chunk x (one sequence's context + chunk) instead of all queries x all keys. In any other order every
    chunk keeps all keys; the masks follow the same rule either way.
    """
    n_q, n_c = packed.block_ids.shape[0], packed.context_features.shape[0]
    if chunk_rows is None:
        return [AttentionChunk(slice(0, n_q), slice(0, n_c), slice(0, n_q), packed.attention_mask())]
    seq, pos, index = packed.context_sequence, packed.context_positions, packed.block_index
    width = int(pos.max()) + 2 if n_c else 1
    key = seq * width + pos  # context rows sorted by (sequence, position) iff strictly increasing
    ordered = bool((key[1:] > key[:-1]).all()) and all(
        bool((x[1:] >= x[:-1]).all()) for x in (packed.block_sequence, index)
    )
    chunks = []
    for start in range(0, n_q, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n_q))
        context, blocks = slice(0, n_c), slice(0, n_q)
        if ordered:
            row_seq = packed.block_sequence[rows]
            first, last = row_seq[0], row_seq[-1]
            last_anchor = packed.block_anchor[rows][row_seq == last].max()
            bounds = torch.stack([first * width, last * width + last_anchor]).to(key.dtype)
            lo, hi = torch.searchsorted(key, bounds).tolist()
            context = slice(lo, hi)
            b_lo = int(torch.searchsorted(index, index[rows][:1]))
            b_hi = int(torch.searchsorted(index, index[rows][-1:], right=True))
            blocks = slice(b_lo, b_hi)
        chunks.append(AttentionChunk(rows, context, blocks, packed.attention_mask(rows, context, blocks)))
    return chunks


class DFlashDraft(nn.Module):
    def __init__(self, cfg: DFlashConfig, embed_weight: torch.Tensor, head_weight: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.num_draft_tokens = cfg.block_size - 1  # mask slots 1..B-1; the anchor slot drafts nothing
        self.max_draft_tokens: int | None = self.num_draft_tokens  # `set_num_draft_tokens` keeps within it
        self.attention_chunk_rows: int | None = ATTENTION_CHUNK_ROWS
        self._decode_cache: DecodeCache | None = None  # set inside `decoding()`
        self.fc = nn.Linear(cfg.num_target_features * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # The target's embedding and LM head: frozen, shared, never saved with the draft.
        self.embed_tokens = nn.Embedding.from_pretrained(embed_weight, freeze=True)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = nn.Parameter(head_weight, requires_grad=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            nn.init.normal_(module.weight, std=0.02)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("embed_tokens.", "lm_head."))}

    def hidden(self, packed: PackedBlocks) -> torch.Tensor:
        """Final normalised hidden states of every block slot: [n_anchors * B, d].

        Attention runs in chunks of `attention_chunk_rows` queries (None: one call with the whole mask);
        the chunks and their masks are built once and shared by every layer.
        """
        cfg = self.cfg
        dtype = self.fc.weight.dtype
        context = self.hidden_norm(self.fc(packed.context_features.to(dtype)))
        x = self.embed_tokens(packed.block_ids).to(dtype) * cfg.embed_scale
        block_rope = rotary(packed.block_positions, cfg.head_dim, cfg.rope_theta)
        context_rope = rotary(packed.context_positions, cfg.head_dim, cfg.rope_theta)
        rows = self.attention_chunk_rows
        if rows is not None:
            rows = max(1, rows // self.block_size) * self.block_size  # whole blocks per chunk
        chunks = attention_chunks(packed, rows)
        for layer in self.layers:
            x = layer(x, context, block_rope, context_rope, chunks)
        return self.norm(x)

    def forward(self, packed: PackedBlocks) -> torch.Tensor:
        return self.hidden(packed)

    def decoding(self) -> AbstractContextManager[None]:
        """Within it, drafting calls are one sequence's rounds: each projects only the context positions
        committed since the call before (`kv_cache.py`). Outside it, every call recomputes the context."""
        return decode_session(self, len(self.layers))

    @torch.no_grad()
    def draft_logits(self, context_features: torch.Tensor, anchor_token: int) -> torch.Tensor:
        """Logits [n, vocab] of the tokens at positions p+1..p+n, from mask slots 1..n (n =
        `num_draft_tokens`: B-1 unless set lower, when the block is [anchor, n masks], as vLLM's proposer
        builds it for n speculative tokens); the anchor sits at position p, right after the context."""
        return self.block_logits(context_features, anchor_token)[1:]

    @torch.no_grad()
    def block_logits(self, context_features: torch.Tensor, anchor_token: int) -> torch.Tensor:
        """Logits [num_draft_tokens + 1, vocab] of every slot of the block anchored after the context, the
        anchor slot included (it drafts nothing: tests read it to show what a shifted convention drafts)."""
        return self.lm_head(self.block_hidden(context_features, anchor_token)).float()

    @torch.no_grad()
    def block_hidden(
        self, context_features: torch.Tensor, anchor_token: int, slots: int | None = None
    ) -> torch.Tensor:
        """Final normalised states [slots, d] of the block anchored right after the context [p, L*d]: the
        anchor at position p, then mask tokens; `slots` defaults to `num_draft_tokens` + 1 (B). The slots
        attend to each other, so a shorter block is not a cut of the full one: it is what an engine runs
        for fewer speculative tokens."""
        device = self.fc.weight.device
        slots = self.num_draft_tokens + 1 if slots is None else slots
        ids = torch.full((slots,), self.cfg.mask_token_id, dtype=torch.long, device=device)
        ids[0] = anchor_token
        p = context_features.shape[0]
        if self._decode_cache is not None:
            return self._cached_block_hidden(context_features, ids)
        zeros = torch.zeros(slots, dtype=torch.long, device=device)
        packed = PackedBlocks(  # the training path, with one block that sees all of its context
            context_features=context_features.to(device),
            context_positions=torch.arange(p, device=device),
            context_sequence=torch.zeros(p, dtype=torch.long, device=device),
            block_ids=ids,
            block_positions=p + torch.arange(slots, device=device),
            block_sequence=zeros,
            block_anchor=zeros + p,
            block_index=zeros,
        )
        return self.hidden(packed)

    def _cached_block_hidden(self, context_features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        cfg, cache = self.cfg, self._decode_cache
        device, dtype = self.fc.weight.device, self.fc.weight.dtype
        new = cache.new_positions(context_features.shape[0])
        if new.stop > new.start:  # every layer's keys read the same projected context
            context = self.hidden_norm(self.fc(context_features[new].to(device=device, dtype=dtype)))
            rope = rotary(torch.arange(new.start, new.stop, device=device), cfg.head_dim, cfg.rope_theta)
            for layer, kv in zip(self.layers, cache.layers, strict=True):
                k, v = layer.self_attn.keys_values(context)
                kv.extend(apply_rotary(k, *rope), v)
            cache.length = new.stop
        x = self.embed_tokens(ids).to(dtype) * cfg.embed_scale
        positions = cache.length + torch.arange(ids.shape[0], device=device)
        rope = rotary(positions, cfg.head_dim, cfg.rope_theta)
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            x = layer.decode(x, rope, kv)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------
# Building and training


def build(settings: DFlashSettings, inputs: DraftInputs) -> DFlashDraft:
    cfg = DFlashConfig.from_target(
        inputs.target_config,
        num_layers=settings.num_layers,
        block_size=settings.block_size,
        layer_ids=inputs.layer_ids,
        mask_token_id=inputs.mask_token_id,
    )
    return DFlashDraft(cfg, inputs.embed, inputs.head)


def anchor_blocks(
    samples: Samples, anchors_per_sequence: int, block_size: int, mask_token_id: int, generator, device
) -> tuple[list[torch.Tensor], PackedBlocks, torch.Tensor]:
    """Anchors drawn in each sample, their blocks packed for one pass (on `device`), and the labels of
    every slot [n_anchors, block_size]: the shared first half of a DFlash and a DSpark micro-step."""
    anchors = [sample_anchors(s["loss_mask"], anchors_per_sequence, generator) for s in samples]
    packed = pack_blocks(
        [(s["input_ids"], s["features"]) for s in samples], anchors, block_size, mask_token_id
    )
    labels = torch.cat(
        [
            block_labels(s["input_ids"], s["loss_mask"], a, block_size)
            for s, a in zip(samples, anchors, strict=True)
        ]
    )
    return anchors, packed.to(device), labels.to(device)


def training_loss(
    forward, model: DFlashDraft, samples: Samples, settings: DFlashSettings, teacher, generator
) -> tuple[torch.Tensor, Stats]:
    """Blocks at sampled anchors; mask slot k (k >= 1) learns the data's token at its own position p+k
    by cross-entropy, weighted exp(-(k-1) / loss_decay). DFlash learns from the data alone: `teacher` is
    unused."""
    device = model.fc.weight.device
    block = model.cfg.block_size
    _, packed, labels = anchor_blocks(
        samples, settings.anchors_per_sequence, block, model.cfg.mask_token_id, generator, device
    )
    # `anchor_blocks` labels slot k with token p+k+1; mask slot k's token p+k is the label of slot k-1
    hidden = forward(packed).view(labels.shape[0], block, -1)[:, 1:].reshape(-1, model.cfg.hidden_size)
    weights = slot_weights(block - 1, settings.loss_decay, device=device)
    return weighted_block_cross_entropy(hidden, model.lm_head.weight, labels[:, :-1], weights)


# ----------------------------------------------------------------------------------------------------
# Files: the trained draft is already the engines' layout


def save(model: DFlashDraft, out_dir: Path) -> None:
    """`config.json` and `model.safetensors` (the draft's own weights only), each atomically."""
    write_draft_files(out_dir, model.cfg.to_hf_dict(), model.trainable_state_dict())


def load(draft_dir: Path, embed_weight: torch.Tensor, head_weight: torch.Tensor) -> DFlashDraft:
    model = DFlashDraft(DFlashConfig.from_hf_dict(read_config(draft_dir)), embed_weight, head_weight)
    return load_weights(model, read_weights(draft_dir), draft_dir, shared=SHARED)


def export(model: DFlashDraft, out_dir: Path, target_config) -> str:
    """`DFlashDraftModel`: `config.json` with `block_size` and `dflash_config` (`mask_token_id`,
    `target_layer_ids`, 0-based: engines read hidden state `id + 1`), and only the draft's own weights
    (the engine shares the target's embedding and LM head). Serve it with `num_speculative_tokens` =
    block_size - 1, the tokens it drafts a round."""
    if not model.cfg.qk_norm:
        raise ConfigError(
            "this DFlash draft was trained without q/k norms, which the engines' DFlash layer always "
            "applies: it would not serve as trained; train it again"
        )
    save(model, out_dir)
    return ARCHITECTURE


REQUIRED_CONFIG = ("architectures", "block_size", "hidden_size", "num_hidden_layers", "vocab_size")


def validate_export(path: Path) -> list[str]:
    """Problems that would stop an engine from loading the draft at `path`; empty when it is loadable."""
    config, shapes, problems = read_export(path)
    if config is None:
        return problems
    problems += missing_fields(config, REQUIRED_CONFIG)
    dflash = config.get("dflash_config", {})
    problems += [
        f"config.json: missing field 'dflash_config.{k}'"
        for k in ("mask_token_id", "target_layer_ids")
        if k not in dflash
    ]
    if config.get("architectures") != [ARCHITECTURE]:
        problems.append(
            f"config.json: architectures={config.get('architectures')}, expected [{ARCHITECTURE!r}]"
        )
    expected: dict[str, tuple[int, ...] | None] = {
        "fc.weight": None,
        "hidden_norm.weight": None,
        "norm.weight": None,
    }
    for i in range(config.get("num_hidden_layers", 0)):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            expected[f"layers.{i}.self_attn.{name}.weight"] = None
        for name in ("gate_proj", "up_proj", "down_proj"):
            expected[f"layers.{i}.mlp.{name}.weight"] = None
        for name in ("input_layernorm", "post_attention_layernorm"):
            expected[f"layers.{i}.{name}.weight"] = None
        for name in ("q_norm", "k_norm"):  # the engines' DFlash layer always applies them
            expected[f"layers.{i}.self_attn.{name}.weight"] = None
    problems += tensor_problems(shapes, expected)
    return problems


SPEC = DraftSpec(
    name=NAME,
    settings=DFlashSettings,
    architectures=(ARCHITECTURE,),
    needs_teacher=False,
    build=build,
    training_loss=training_loss,
    save=save,
    load=load,
    export=export,
    validate_export=validate_export,
)
