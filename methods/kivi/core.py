"""KIVI (arXiv 2402.02750): a tuning-free asymmetric 2-bit KV cache, keys per channel and values
per token, with a full-precision residual of recent tokens.

Checked against the official repository (github.com/jy-yuan/KIVI, ``quant/new_pack.py`` and
``models/llama_kivi.py``): keys are grouped along **tokens** — one min / scale per channel for
each group of ``G`` tokens (the outliers of keys live in fixed channels, §3.2) — and values
along the **head dimension** — one min / scale per token for each ``G`` channels. Each group is
min-max asymmetric onto ``0 … 2^b − 1``:

    s = (max − min) / (2^b − 1),   code = round((x − min) / s),   x̂ = code · s + min

(stored here as an integer zero point, ``x̂ = (code − z)·s``, ``z = round(−min / s)``: the
numerics core's asymmetric grid, which represents 0 exactly.) Scales and zero points are
fp16 as in the reference.

The residual (§3.3), as ``models/llama_kivi.py`` runs it at each decoding step: the new key
joins the full-precision keys, attention reads them, and once ``R`` have gathered they are
quantized all at once — attention sees 1 … ``R`` full-precision keys, ``window=1, flush=R`` in
``harness.kvcache`` terms; the new value joins the ``R`` full-precision values, attention reads
``R + 1``, then the oldest is quantized — ``window=R + 1, flush=1``. (The reference's prefill
attends the prompt in full precision and only stores it quantized; here the prompt's queries see
the cache as a decoding step would, so scoring and decoding agree.) Defaults: ``G = 32``,
``R = 128``, 2 bits (``example.py`` runs ``R = 32``; the paper's experiments use 128 —
unverified here, the PDF could not be opened).

Both codecs expose their decode store in ``kernels.kv_decode``'s layout
(``KVCodec.kernel_layout``): the chunk-major store (codes already packed along the head
dimension into uint32 words, as the official repository packs codes into 32-bit words for its
CUDA kernels, ``quant/new_pack.py``) is transposed head-major on every read.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from harness import kvcache
from methods.base import check_bits
from numerics.config import QuantConfig
from numerics.qarray import QArray
from numerics.quantize import quantize

BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KIVIConfig:
    bits: int = 2  # key and value code bits (KIVI-2; the paper also runs KIVI-4)
    group: int = 32  # G: tokens per key group, channels per value group
    residual: int = 128  # R: recent tokens kept in full precision
    keys: str = "channel"  # "channel" (KIVI); "token": the ablation of §3.2 (keys like values)

    def __post_init__(self):
        check_bits(self.bits, BITS, "KIVI")
        if self.keys not in ("channel", "token"):
            raise ValueError(f"KIVI: keys must be 'channel' or 'token', got {self.keys!r}")
        for f in ("group", "residual"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"KIVI: {f} must be a positive int, got {v!r}")
        if self.residual % self.group:
            raise ValueError(
                f"KIVI: residual {self.residual} must be a multiple of the group {self.group} "
                "(keys leave the residual in whole groups)"
            )


def _cfg(bits: int, axis: int, group: int) -> QuantConfig:
    return QuantConfig(format=f"uint{bits}", granularity="group", axis=axis, group_size=group,
                       zero_point=True, scale_dtype="float16")  # fmt: skip


def _stored(qa: QArray) -> QArray:
    """As the cache holds it: codes packed along the head dimension into uint32 words (the
    layout ``kernels.kv_decode`` reads), fp16 scales and zero points (small integers, exact)."""
    return dataclasses.replace(qa, zero=qa.zero.astype(jnp.float16)).pack(axis=3, word_bits=32)


def _head_major(a):
    """A chunk-major store leaf ``[n, B, c, kv, X]`` as ``[B, kv, n·c, X]``."""
    n, B, c, H, X = a.shape
    return jnp.transpose(a, (1, 3, 0, 2, 4)).reshape(B, H, n * c, X)


def _layout(store, group: tuple[int, int]) -> kvcache.KernelLayout:
    return kvcache.KernelLayout(codes=_head_major(store.codes), scale=_head_major(store.scale),
                                zero=_head_major(store.zero), format=store.format,
                                group=group)  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelKeys(kvcache.KVCodec):
    """Keys ``[B, G, kv, hd]``: one scale / zero per channel over the chunk's ``G`` tokens."""

    bits: int = 2

    def encode(self, layer, x):
        return _stored(quantize(x, _cfg(self.bits, 1, self.chunk)))

    def decode(self, layer, code):
        return code.dequantize()

    def element_bits(self, head_dim):
        return self.bits + 2 * 16 / self.chunk

    def kernel_layout(self, layer, store):
        return _layout(store, (self.chunk, 1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenValues(kvcache.KVCodec):
    """Values ``[B, 1, kv, hd]``: one scale / zero per token over each ``group`` channels."""

    bits: int = 2
    group: int = 32

    def encode(self, layer, x):
        return _stored(quantize(x, _cfg(self.bits, 3, min(self.group, x.shape[3]))))

    def decode(self, layer, code):
        return code.dequantize()

    def element_bits(self, head_dim):
        return self.bits + 2 * 16 / min(self.group, head_dim)

    def kernel_layout(self, layer, store):
        return _layout(store, (1, min(self.group, store.shape[-1])))  # shape: unpacked
