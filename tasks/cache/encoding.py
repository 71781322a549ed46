"""Feature encodings of the target cache: how a [T, D] matrix of target features becomes bytes and back.

Chosen by `storage.encoding`; the manifest and every shard record which one wrote them.

    name           bytes a token (D features)   layout of one sample's bytes
    bf16           2 D                          [T, D] bfloat16: the reference, exact for a bf16 target
    fp8            D + 4                        [T] float32 scales, then [T, D] float8 e4m3fn
    int8           ceil(D / 64) (64 + 2)        [T, G] bfloat16 scales, then [T, G, 64] 8-bit codes
    int6           ceil(D / 64) (48 + 2)        the same with 6-bit codes, 4 to 3 bytes
    int4           ceil(D / 64) (32 + 2)        the same with 4-bit codes, 2 to a byte
    int4_outliers  int4 + 4 ceil(D / 128)       int4 after each row's largest features are kept apart
    int4_rot       as int4                      int4 of each group of 64 after a fixed rotation
    int4_mixed     int4_rot; the teacher's      the other captured layers side by side in int4_rot,
                   layer int6_rot + outliers    then the teacher's (the deepest) int6_rot + outliers

For Qwen3-4B (5 captured layers x 2560 = 12,800 features) that is 25,600, 12,804, 13,200, 10,000,
6,800, 7,200, 6,800 and 7,520 bytes a token; `estimate.py` adds the ids and loss mask and
compares with upstream (int4_mixed: 0.245x). Relative error per token, ||decoded - x|| / ||x||, on
SmolLM2-135M's layers 1, 14 and 27 (mean, then over each row without its 1% largest features): fp8
1.9% / 2.6%, int8 1.4% / 2.6%, int6 5.7% / 10%, int4 20% / 35%, int4_outliers 5.7% / 10%. The tests
pin bounds on stories260k for every encoding (int4_rot about 0.6x int4's error; int4_mixed's teacher
layer about int6's); `bench/cache_fidelity.py` measures what each encoding does to the teacher.

fp8 scales each token row by its absolute maximum (scale = absmax / 448, the largest e4m3fn value), so
one outlier channel costs a row precision but never overflows. The integer encodings are symmetric
(no zero point) with one scale per group of 64 consecutive features of a row, so an outlier only
coarsens its own group. As in llama.cpp's Q4_0, a group's scale maps its largest-magnitude value to
the most negative code, -2^(bits-1), which makes use of all 2^bits codes (step absmax / 8 for int4,
not absmax / 7); a value of the opposite sign as large as that one saturates at 2^(bits-1) - 1. Codes
are stored offset by 2^(bits-1), little-endian, the first feature in the low bits. When D is not a
multiple of 64 the last group is padded with zeros, stored, and dropped on decode.

int4_rot rotates each group of 64 features by a fixed orthonormal matrix (the signs of a fixed
pattern, then a 64-point Walsh-Hadamard transform) before int4, and back after decoding. A rotation
keeps the norm of the error but spreads a group's values evenly (near-Gaussian), so the scale is set
by about 2.5 standard deviations instead of by the group's largest value: on SmolLM2 its error is 2.5x
below int4's for the same bytes. The pattern is part of the format: it comes from sha256, not an RNG.

int4_mixed spends the bytes where the teacher is: Eagle3 and DSpark recompute the target's
distribution from the deepest captured layer (`models/teacher.py`), whose error reaches the logits
through only a few layers and the LM head, while the other layers are inputs to a draft that is
trained on them. So that layer gets int6_rot with outliers kept apart (`WithOutliers`) and the others
int4_rot: top-1 agreement of the recomputed teacher with the target's own 0.9934 on SmolLM2 (fp8:
0.9872, int4_outliers: 0.9734; `bench/cache_fidelity.py`), at 0.245x upstream's bytes for Qwen3-4B.
It needs the layer ids (`get_encoding(name, layer_ids)`), which each shard records; without them the
row is one layer, the teacher's.

Scales are computed and rounded to their stored type before quantizing, so decode uses exactly the
scale the codes were made with. Non-finite features are refused by the quantized encodings (a NaN or
inf would poison the whole row or group); bf16 stores them as they are. Encoding runs on the device
the features are on (a GPU when the cache stage leaves them there) and returns host bytes. Decoding
runs on the `device` it is given, torch ops only: training hands the stored bytes to its own device, so
a GPU decodes them (and they cross to it compressed) while the CPU only reads. No Prefect, MLflow or
Hydra here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from deepspec.models.errors import ConfigError

GROUP_SIZE = 64
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


class Encoding(Protocol):
    name: str

    def encode(self, features: torch.Tensor) -> bytes:
        """[T, D] floats as bytes."""

    def decode(
        self, buf, num_tokens: int, feature_dim: int, dtype: torch.dtype = torch.float32, device=None
    ) -> torch.Tensor:
        """Bytes (a bytes-like object or a uint8 tensor) as a [num_tokens, feature_dim] tensor of `dtype` on
        `device` (the CPU by default); ValueError for a `buf` of the wrong size."""

    def bytes_per_token(self, feature_dim: int) -> float:
        """Encoded bytes per token of `feature_dim` features."""


def _check_matrix(features: torch.Tensor) -> None:
    if features.dim() != 2:
        raise ValueError(f"features must be [T, D], got shape {tuple(features.shape)}")


def _byte_tensor(buf, want: int, name: str, num_tokens: int, feature_dim: int, device) -> torch.Tensor:
    """`buf` as a uint8 tensor on `device` (a copy: stored buffers are read-only); ValueError unless it
    holds `want` bytes."""
    if isinstance(buf, torch.Tensor):
        data = buf.reshape(-1)
    else:
        data = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy())
    if data.numel() != want:
        raise ValueError(
            f"{name} features of {num_tokens} tokens x {feature_dim} take {want} bytes, found {data.numel()}"
        )
    if not want:  # an empty array's stride is 0, which views across element sizes refuse
        return torch.empty(0, dtype=torch.uint8, device=device)
    return data.to(device)


def _field(data: torch.Tensor, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` little-endian values of `dtype` stored from byte `start` of `data` (cloned, so that the
    view starts aligned)."""
    size = torch.empty(0, dtype=dtype).element_size()
    return data[start : start + count * size].clone().view(dtype)


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"features contain NaN or inf, which {name} cannot encode; use storage.encoding=bf16"
        )


def _host_bytes(*parts: torch.Tensor) -> bytes:
    return b"".join(p.contiguous().cpu().numpy().tobytes() for p in parts)


def _bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """bfloat16 values as their int16 bit patterns (little-endian once on the host)."""
    return x.to(torch.bfloat16).contiguous().view(torch.int16)


class BF16:
    """Raw little-endian bfloat16: the reference encoding."""

    name = "bf16"

    def bytes_per_token(self, feature_dim: int) -> float:
        return 2.0 * feature_dim

    def encode(self, features: torch.Tensor) -> bytes:
        _check_matrix(features)
        return _host_bytes(_bf16_bits(features.detach()))

    def decode(
        self, buf, num_tokens: int, feature_dim: int, dtype: torch.dtype = torch.float32, device=None
    ) -> torch.Tensor:
        want = num_tokens * feature_dim * 2
        data = _byte_tensor(buf, want, self.name, num_tokens, feature_dim, device)
        return data.view(torch.bfloat16).reshape(num_tokens, feature_dim).to(dtype)


class FP8:
    """float8 e4m3fn with one float32 scale per token: scale = absmax / 448."""

    name = "fp8"

    def bytes_per_token(self, feature_dim: int) -> float:
        return feature_dim + 4.0

    def encode(self, features: torch.Tensor) -> bytes:
        _check_matrix(features)
        x = features.detach().float()
        _check_finite(x, self.name)
        scale = x.abs().amax(dim=1, keepdim=True) / FP8_MAX if x.numel() else x.new_zeros(x.shape[0], 1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (x / safe).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return _host_bytes(scale.reshape(-1), codes)

    def decode(
        self, buf, num_tokens: int, feature_dim: int, dtype: torch.dtype = torch.float32, device=None
    ) -> torch.Tensor:
        want = num_tokens * (feature_dim + 4)
        data = _byte_tensor(buf, want, self.name, num_tokens, feature_dim, device)
        scale = _field(data, 0, num_tokens, torch.float32)
        codes = data[4 * num_tokens :].view(torch.float8_e4m3fn)
        out = codes.float().reshape(num_tokens, feature_dim) * scale.reshape(-1, 1)
        return out.to(dtype)


class GroupInt:
    """Symmetric `bits`-bit integers, one bfloat16 scale per group of 64 consecutive features of a row."""

    def __init__(self, bits: int, group_size: int = GROUP_SIZE):
        chunk_bits = math.lcm(bits, 8)  # whole codes filling whole bytes: 2 codes in 1 byte for int4
        if not 2 <= bits <= 8 or (group_size * bits) % chunk_bits:
            raise ValueError(f"unsupported integer encoding: {bits} bits in groups of {group_size}")
        self.name = f"int{bits}"
        self.bits, self.group_size = bits, group_size
        self.qmax = 1 << (bits - 1)  # codes span [-qmax, qmax - 1]
        self.codes_per_chunk, self.bytes_per_chunk = chunk_bits // bits, chunk_bits // 8
        # the integer type that holds a chunk: bytes themselves when a chunk is one byte
        self.word = torch.uint8 if chunk_bits == 8 else torch.int32 if chunk_bits < 32 else torch.int64
        self.group_bytes = group_size * bits // 8

    def _groups(self, feature_dim: int) -> int:
        return -(-feature_dim // self.group_size)

    def bytes_per_token(self, feature_dim: int) -> float:
        return float(self._groups(feature_dim) * (self.group_bytes + 2))

    def encode(self, features: torch.Tensor) -> bytes:
        _check_matrix(features)
        x = features.detach().float()
        _check_finite(x, self.name)
        t, d = x.shape
        g = self._groups(d)
        if g * self.group_size != d:
            x = torch.nn.functional.pad(x, (0, g * self.group_size - d))
        x = x.reshape(t, g, self.group_size)
        # The signed value of largest magnitude maps to -qmax; the scale is rounded to bf16 first.
        peak = x.gather(2, x.abs().argmax(dim=2, keepdim=True))
        scale = (peak / -self.qmax).to(torch.bfloat16)
        safe = torch.where(scale != 0, scale.float(), torch.ones_like(peak))
        q = (x / safe).round_().clamp_(-self.qmax, self.qmax - 1).add_(self.qmax).to(self.word)
        return _host_bytes(scale.view(torch.int16), self._pack(q))

    def decode(
        self, buf, num_tokens: int, feature_dim: int, dtype: torch.dtype = torch.float32, device=None
    ) -> torch.Tensor:
        g = self._groups(feature_dim)
        n_scales = num_tokens * g
        want = n_scales * (self.group_bytes + 2)
        data = _byte_tensor(buf, want, self.name, num_tokens, feature_dim, device)
        scale = _field(data, 0, n_scales, torch.bfloat16).float().reshape(num_tokens, g, 1)
        q = self._unpack(data[2 * n_scales :])
        q = q.reshape(num_tokens, g, self.group_size).float().sub_(self.qmax)
        out = q.mul_(scale).reshape(num_tokens, g * self.group_size)[:, :feature_dim]
        return out.to(dtype).contiguous()

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes in [0, 2^bits) as bytes, the first code of each chunk in the lowest bits."""
        codes = codes.reshape(-1, self.codes_per_chunk)
        word = codes[:, 0].clone()
        for i in range(1, self.codes_per_chunk):
            word |= codes[:, i] << (i * self.bits)
        if self.word == torch.uint8:
            return word
        return torch.stack([(word >> (8 * j)) & 0xFF for j in range(self.bytes_per_chunk)], 1).to(torch.uint8)

    def _unpack(self, data: torch.Tensor) -> torch.Tensor:
        data = data.reshape(-1, self.bytes_per_chunk).to(self.word)
        word = data[:, 0].clone()
        for j in range(1, self.bytes_per_chunk):
            word |= data[:, j] << (8 * j)
        mask = (1 << self.bits) - 1
        return torch.stack([(word >> (i * self.bits)) & mask for i in range(self.codes_per_chunk)], 1)


class WithOutliers:
    """A group-wise encoding of each row after its ceil(D / 128) largest-magnitude features are taken out.

    Real residual streams carry a few channels hundreds of times larger than the rest (SmolLM2-135M:
    24,890 against a median channel maximum of 47); in a group of 64 such a value sets the scale and
    the other 63 values round to a handful of codes. Those features are stored apart, as a feature
    index (uint16, uint32 past 65,536 features) and a bfloat16 value, and the remaining row, with
    zeros in their place, is encoded by `base`. Layout: [T, k] indices, [T, k] values, then `base`.
    """

    def __init__(self, base: GroupInt, features_per_outlier: int = 128):
        self.name = f"{base.name}_outliers"
        self.base, self.per = base, features_per_outlier

    def _layout(self, feature_dim: int) -> tuple[int, np.dtype]:
        k = min(feature_dim, -(-feature_dim // self.per))
        return k, np.dtype("<u2" if feature_dim <= 1 << 16 else "<u4")

    def bytes_per_token(self, feature_dim: int) -> float:
        k, index = self._layout(feature_dim)
        return k * (index.itemsize + 2) + self.base.bytes_per_token(feature_dim)

    def encode(self, features: torch.Tensor) -> bytes:
        _check_matrix(features)
        x = features.detach().float()
        _check_finite(x, self.name)
        k, index = self._layout(x.shape[1])
        idx = x.abs().topk(k, dim=1, sorted=False).indices
        values = x.gather(1, idx)
        rest = x.scatter(1, idx, 0.0)
        idx = idx.cpu().numpy().astype(index)
        return idx.tobytes() + _host_bytes(_bf16_bits(values)) + self.base.encode(rest)

    def decode(
        self, buf, num_tokens: int, feature_dim: int, dtype: torch.dtype = torch.float32, device=None
    ) -> torch.Tensor:
        k, index = self._layout(feature_dim)
        want = int(num_tokens * self.bytes_per_token(feature_dim))
        data = _byte_tensor(buf, want, self.name, num_tokens, feature_dim, device)
        n_idx, n_val = num_tokens * k * index.itemsize, num_tokens * k * 2
        signed = torch.int16 if index.itemsize == 2 else torch.int32  # torch reads them signed: mask back
        idx = _field(data, 0, num_tokens * k, signed).long() & ((1 << (8 * index.itemsize)) - 1)
        values = _field(data, n_idx, num_tokens * k, torch.bfloat16).float().reshape(num_tokens, k)
        out = self.base.decode(data[n_idx + n_val :], num_tokens, feature_dim, torch.float32, device)
        return out.scatter_(1, idx.reshape(num_tokens, k), values).to(dtype)


def _walsh_hadamard(n: int) -> torch.Tensor:
    """The orthonormal n x n Walsh-Hadamard matrix (Sylvester's construction; n a power of 2)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(n)


def _fixed_signs(n: int) -> torch.Tensor:
    """n signs (+-1) from the bits of sha256: the same on every machine and in every version."""
    blocks = range(-(-n // 256))  # 256 bits a digest
    digest = b"".join(hashlib.sha256(f"deepspec-rotation-{n}-{i}".encode()).digest() for i in blocks)
    bits = np.unpackbits(np.frombuffer(digest, dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(np.float32) * 2 - 1)


class Rotated:
    """`base` over each group of `size` features after the rotation x -> (x * signs) @ H, H the
    orthonormal Walsh-Hadamard matrix; decoding applies the inverse, y -> (y @ H) * signs."""

    def __init__(self, base: Encoding, size: int = GROUP_SIZE):
        self.name = f"{base.name}_rot"
        self.base, self.size = base, size
        self.matrix = _fixed_signs(size)[:, None] * _walsh_hadamard(size)  # diag(signs) @ H

    def _padded(self, feature_dim: int) -> int:
        return -(-feature_dim // self.size) * self.size

    def bytes_per_token(self, feature_dim: int) -> float:
        return self.base.bytes_per_token(self._padded(feature_dim))

    def _apply(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        t, d = x.shape
        width = self._padded(d)
        x = torch.nn.functional.pad(x, (0, width - d)).reshape(t, width // self.size, self.size)
        return (x @ matrix.to(x.device)).reshape(t, width)

    def encode(self, features: torch.Tensor) -> bytes:
        _check_matrix(features)
        x = features.detach().float()
        _check_finite(x, self.name)
        return self.base.encode(self._apply(x, self.matrix))

    def decode(
        self, buf, num_tokens: int, feature_dim: int, dtype: torch.dtype = torch.float32, device=None
    ) -> torch.Tensor:
        y = self.base.decode(buf, num_tokens, self._padded(feature_dim), torch.float32, device)
        return self._apply(y, self.matrix.t())[:, :feature_dim].to(dtype).contiguous()


class TeacherMixed:
    """One encoding for the teacher's layer and another for the other captured layers.

    The feature row is the captured layers side by side, in `layer_ids` order; the teacher's is the
    deepest (`models.teacher.Teacher` reads the same block). A sample's bytes are the other layers, side
    by side in one [T, (L - 1) d] matrix, in `features`, then the teacher's [T, d] in `teacher`: two decodes a
    sample, whatever L, since training decodes in its own thread and every torch call costs it.
    `for_layers` gives the encoding of a layout; the registered one is a single layer, the teacher's.
    """

    def __init__(self, name: str, features: Encoding, teacher: Encoding, layer_ids: Sequence[int] = (0,)):
        self.name, self.features, self.teacher = name, features, teacher
        self.layer_ids = [int(i) for i in layer_ids]
        if not self.layer_ids:
            raise ValueError(f"{name} needs at least one layer id")
        self.deepest = self.layer_ids.index(max(self.layer_ids))

    def for_layers(self, layer_ids: Sequence[int]) -> TeacherMixed:
        return TeacherMixed(self.name, self.features, self.teacher, layer_ids)

    def _layer_width(self, feature_dim: int) -> int:
        layers = len(self.layer_ids)
        if feature_dim % layers:
            raise ValueError(
                f"{self.name}: {feature_dim} features do not split into {layers} layers "
                f"(layer ids {self.layer_ids})"
            )
        return feature_dim // layers

    def _sizes(self, feature_dim: int) -> tuple[int, int, float, float]:
        """(d, width of the other layers, their bytes a token, the teacher's bytes a token)."""
        d = self._layer_width(feature_dim)
        rest = feature_dim - d
        return d, rest, self.features.bytes_per_token(rest) if rest else 0.0, self.teacher.bytes_per_token(d)

    def bytes_per_token(self, feature_dim: int) -> float:
        _, _, rest_bytes, teacher_bytes = self._sizes(feature_dim)
        return rest_bytes + teacher_bytes

    def encode(self, features: torch.Tensor) -> bytes:
        _check_matrix(features)
        d, rest, _, _ = self._sizes(features.shape[1])
        a, b = self.deepest * d, (self.deepest + 1) * d
        others = torch.cat([features[:, :a], features[:, b:]], dim=1)
        return (self.features.encode(others) if rest else b"") + self.teacher.encode(features[:, a:b])

    def decode(
        self, buf, num_tokens: int, feature_dim: int, dtype: torch.dtype = torch.float32, device=None
    ) -> torch.Tensor:
        d, rest, rest_bytes, teacher_bytes = self._sizes(feature_dim)
        want = int(num_tokens * (rest_bytes + teacher_bytes))
        data = _byte_tensor(buf, want, self.name, num_tokens, feature_dim, device)
        split = int(num_tokens * rest_bytes)
        teacher = self.teacher.decode(data[split:], num_tokens, d, dtype, device)
        if not rest:
            return teacher
        others = self.features.decode(data[:split], num_tokens, rest, dtype, device)
        a = self.deepest * d
        return torch.cat([others[:, :a], teacher, others[:, a:]], dim=1)


ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (
        BF16(),
        FP8(),
        GroupInt(8),
        GroupInt(6),
        GroupInt(4),
        WithOutliers(GroupInt(4)),
        Rotated(GroupInt(4)),
        TeacherMixed("int4_mixed", Rotated(GroupInt(4)), WithOutliers(Rotated(GroupInt(6)))),
    )
}


def get_encoding(name: str, layer_ids: Sequence[int] | None = None) -> Encoding:
    """The encoding called `name` for features of the captured `layer_ids` (None: one layer);
    ConfigError listing the choices for an unknown name."""
    try:
        encoding = ENCODINGS[str(name)]
    except KeyError:
        raise ConfigError(f"storage.encoding={name!r} is not one of {list(ENCODINGS)}") from None
    if layer_ids is not None and isinstance(encoding, TeacherMixed):
        return encoding.for_layers(layer_ids)
    return encoding
