"""The teacher of Eagle3 and DSpark: the target's next-token distribution, its frozen LM head applied to
its final (normalised) hidden state, only at the rows a loss reads.

Online training captures that state in the target forward that yields the features (the sample carries
`final_hidden`). A cache holds only the chosen layers, so `Teacher` recomputes it: the cached feature of
the last captured layer m (the residual stream after layer m) runs through the target's decoder layers
m+1..L-1 and final norm, loaded alone (`load_target_tail`: causal attention over positions 0..T-1, as
the target ran). For m = L-1 nothing runs: transformers records the normalised final state as the last
layer's output, so the cached feature is the state itself. The recomputed teacher starts from the
cache's rounded features, so it differs from the online one by that rounding.

Targets whose later layers read more than the residual stream (Gemma-4's per-layer inputs and shared
keys and values) cannot be recomputed: `tail_start` raises a ConfigError that says to train online or
to capture layer L-1.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from deepspec.models.errors import ConfigError, DeepSpecError
from deepspec.models.target import load_target, resolve_dtype, resolve_source

log = logging.getLogger(__name__)


def tail_start(layer_ids: list[int], text_config, *, online: bool) -> int | None:
    """The first target layer the cached-mode teacher must run (None: the cached feature is the final
    state, or online training captures it); ConfigError when the target's later layers cannot be rerun."""
    if online:
        return None
    last, num_layers = max(layer_ids), text_config.num_hidden_layers
    if last + 1 >= num_layers:
        return None
    reads_more = [
        what
        for what, present in (
            ("per-layer token inputs", getattr(text_config, "hidden_size_per_layer_input", None)),
            ("keys and values shared across layers", getattr(text_config, "num_kv_shared_layers", 0)),
        )
        if present
    ]
    if reads_more:
        raise ConfigError(
            f"the teacher is recomputed from the last cached layer ({last}) through layers "
            f"{last + 1}..{num_layers - 1}, but this {text_config.model_type} target's layers also read "
            f"{' and '.join(reads_more)}, which the cache does not hold: train with storage.mode=online, "
            f"or capture the last layer ({num_layers - 1}) in target.layer_ids"
        )
    return last + 1


class TargetTail(nn.Module):
    """The target's decoder layers m+1..L-1 and final norm: its final hidden state from the residual
    stream after layer m, run as the target runs it (causal attention, positions 0..T-1)."""

    def __init__(self, base: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.base, self.dtype = base, dtype

    @torch.no_grad()
    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        """residual [T, d] after layer m -> final normalised hidden state [T, d]."""
        positions = torch.arange(residual.shape[0], device=residual.device)[None]
        out = self.base(inputs_embeds=residual[None].to(self.dtype), position_ids=positions, use_cache=False)
        return out.last_hidden_state[0]


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (`layers`, `norm`) of a causal LM, inside a multimodal wrapper too."""
    base = model.model
    return getattr(base, "language_model", base)


def _keep_layers_from(base: nn.Module, first: int) -> None:
    """Drop the decoder layers before `first` and the embedding; the config follows the kept layers."""
    config = copy.deepcopy(base.config)
    config.num_hidden_layers = len(base.layers) - first
    if getattr(config, "layer_types", None):  # the forward reads the type of layer i from the config
        config.layer_types = list(config.layer_types)[first:]
    base.config = config
    base.layers = nn.ModuleList(list(base.layers)[first:])
    base.embed_tokens = nn.Identity()  # the tail starts from a residual stream, never from tokens


def _tail_name(key: str, prefix: str, first: int) -> str | None:
    """The name in the kept decoder of a checkpoint tensor (layer i -> layer i - first), or None."""
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix) :]
    if rest.startswith("norm."):
        return rest
    parts = rest.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) >= first:
        return f"layers.{int(parts[1]) - first}.{parts[2]}"
    return None


def load_target_tail(
    path: str,
    first_layer: int,
    device: torch.device,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    dtype: str = "float32",
) -> TargetTail:
    """`TargetTail` for layers `first_layer`..L-1: from a local safetensors checkpoint only those layers'
    weights and the final norm are read; otherwise (a hub id) the whole target loads, then the rest goes."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_source(path, gguf_file)
    torch_dtype = resolve_dtype(dtype)
    files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    base = None
    if files:
        config = AutoConfig.from_pretrained(source, revision=revision)
        with init_empty_weights():  # parameters on the meta device, buffers (RoPE tables) real
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        base = _decoder(model)
        prefix = next(name for name, module in model.named_modules() if module is base) + "."
        _keep_layers_from(base, first_layer)
        state = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    name = _tail_name(key, prefix, first_layer)
                    if name is not None:
                        state[name] = f.get_tensor(key).to(torch_dtype)
        base.load_state_dict(state, strict=False, assign=True)
        if any(p.is_meta for p in base.parameters()):  # weights under other names: take the slow road
            log.warning("%s: the tail layers' weights were not all found by name; loading the target", source)
            base = None
    if base is None:
        model, _ = load_target(path, gguf_file, revision, dtype)
        base = _decoder(model)
        _keep_layers_from(base, first_layer)
    return TargetTail(base.to(device).eval().requires_grad_(False), torch_dtype)


class Teacher:
    """The target's final hidden state of a sample, and its frozen LM head on chosen rows.

    `head` is the target's LM head weight [V, d] (on `device`, in the target's dtype); `softcap` the
    target's logit cap (Gemma: softcap * tanh(logits / softcap)); `columns` the block of the features
    holding the last captured layer; `tail` the layers after it (None: nothing to run).
    """

    def __init__(
        self,
        head: torch.Tensor,
        device: torch.device,
        *,
        columns: slice,
        online: bool,
        tail: TargetTail | None = None,
        softcap: float | None = None,
    ):
        self.head, self.device, self.columns = head, device, columns
        self.online, self.tail, self.softcap = online, tail, softcap

    @classmethod
    def for_target(
        cls,
        text_config,
        head_weight: torch.Tensor,
        layer_ids: list[int],
        device: torch.device,
        *,
        online: bool,
        path: str,
        gguf_file: str | None = None,
        revision: str | None = None,
        dtype: str = "float32",
    ) -> Teacher:
        """The teacher of a target whose features are `layer_ids` (cached, or captured online)."""
        d = text_config.hidden_size
        k = list(layer_ids).index(max(layer_ids))
        first = tail_start(list(layer_ids), text_config, online=online)
        tail = None
        if first is not None:
            tail = load_target_tail(path, first, device, gguf_file=gguf_file, revision=revision, dtype=dtype)
        return cls(
            head_weight.to(device=device, dtype=resolve_dtype(dtype)),
            device,
            columns=slice(k * d, (k + 1) * d),
            online=online,
            tail=tail,
            softcap=getattr(text_config, "final_logit_softcapping", None),
        )

    @torch.no_grad()
    def final_hidden(self, sample: dict) -> torch.Tensor:
        """[T, d] on the device."""
        if "final_hidden" in sample:
            return sample["final_hidden"].to(self.device)
        if self.online:
            raise DeepSpecError("the online stream yielded no final hidden state (open it with final_hidden)")
        residual = sample["features"][:, self.columns].to(self.device)
        return residual if self.tail is None else self.tail(residual)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = (hidden.to(self.head.dtype) @ self.head.t()).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
