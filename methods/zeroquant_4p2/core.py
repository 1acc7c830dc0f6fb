"""ZeroQuant(4+2) — FP6 (E3M2) weights with coarse-grained scales; the 6 bits stored as 4 + 2.

Wu, Xia, Youn, Zheng, Chen, Bakhtiari, Wyatt, Aminabadi, He, Ruwase, Song, Yao,
"ZeroQuant(4+2): Redefining LLMs Quantization with a New FP6-Centric Strategy for Diverse
Generative Tasks", arXiv 2312.08583 (its GPU kernel became FP6-LLM, arXiv 2401.14112).

* **Weights** — FP6 E3M2 (sign, 3 exponent, 2 mantissa bits; no inf / NaN, largest 28), one
  fp16 scale per output channel (the paper's coarse-grained quantization, ``group_size=None``):
  ``s = max_j |W_ij| / 28`` and each ``W_ij / s`` rounded to the nearest E3M2 value.
  Activations stay 16-bit (W6A16).
* **The 4+2 format** (§5): a 6-bit code does not align with 32-bit words; the paper stores each
  code as a 4-bit part and a 2-bit part in two separate arrays, so every plane packs a
  power-of-two number of codes per word. :func:`split_4p2` / :func:`join_4p2` are that
  layout, lossless (``numerics.packing.pack_planes``); the storage is still 6 bits per weight
  plus the scales (``numerics.packing.bits_per_weight`` of the ``QArray``).

Official code checked: microsoft/DeepSpeed — ``deepspeed/inference/v2/modules/implementations/
linear/quantized_linear.py`` (``QuantizedWf6Af16Linear``: the FP6 weight split into a 4-bit and
a 2-bit part by ``preprocess_weight``, scales of shape ``[out, 1]``: per output channel) and
``deepspeed/ops/fp_quantizer/quantize.py`` (``q_bits=6`` means 2 mantissa bits: E3M2).

Details as in the reference: E3M2, per-channel fp16 scales, max-abs scaling, round to nearest.

Differences, on purpose: the split here is the plain bit-plane split along the input axis; the
kernel's tile-wise interleaving for tensor-core fragments (a layout for one GPU's registers,
not a numerical choice) is not reproduced. Weights are RTN (the paper's FP6 is RTN too).
"""

from __future__ import annotations

import dataclasses

from jaxtyping import Array, Float

from methods.base import LayerResult, LayerStats, check_bits, check_group
from numerics.config import QuantConfig
from numerics.packing import pack_planes, unpack_planes
from numerics.qarray import QArray
from numerics.quantize import quantize

FORMATS = ("fp6_e3m2", "fp6_e2m3")
PARTS = (4, 2)  # the 4+2 split of a 6-bit code, most significant bits first


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZeroQuant42Config:
    bits: int = 6  # weight bits (FP6 only)
    format: str = "fp6_e3m2"  # the paper's E3M2 (E2M3 for the comparison)
    group_size: int | None = None  # None: one scale per output channel (coarse-grained)
    ragged: bool = False  # allow a shorter last group when grouped
    scale_dtype: str = "float16"  # scales stored as fp16

    def __post_init__(self) -> None:
        check_bits(self.bits, (6,), "ZeroQuant(4+2) weight")
        check_group(self.group_size, "ZeroQuant(4+2)")
        if self.format not in FORMATS:
            raise ValueError(f"ZeroQuant(4+2): format {self.format!r} not one of {FORMATS}")

    @classmethod
    def for_format(cls, bits: int, group_size: int | None, **kw) -> ZeroQuant42Config:
        """FP6 is the one format: any requested bit width maps to 6 bits, keeping the group."""
        del bits
        return cls(group_size=group_size, **kw)

    def weight_quant(self) -> QuantConfig:
        gran = {"granularity": "channel"}
        if self.group_size is not None:
            gran = {"granularity": "group", "group_size": self.group_size, "ragged": self.ragged}
        return QuantConfig(format=self.format, scale_dtype=self.scale_dtype, **gran)


def quantize_layer(
    W: Float[Array, "out in"], stats: LayerStats, cfg: ZeroQuant42Config, *, key=None
) -> LayerResult:
    del stats, key  # data-free
    return LayerResult(quantize(W, cfg.weight_quant()))


def split_4p2(qa: QArray, *, word_bits: int = 32) -> tuple[Array, Array]:
    """The 4+2 layout of a 6-bit ``QArray``'s codes: (4-bit plane, 2-bit plane), each packed
    along the input (last) axis into ``uint{word_bits}`` words."""
    if qa.format.bits != sum(PARTS):
        raise ValueError(f"split_4p2: needs 6-bit codes, got {qa.format.name}")
    return pack_planes(qa.unpack().codes, PARTS, axis=-1, word_bits=word_bits)


def join_4p2(planes: tuple[Array, Array], qa_like: QArray) -> QArray:
    """Inverse of :func:`split_4p2`: ``qa_like`` with its codes rebuilt from the two planes."""
    codes = unpack_planes(planes, PARTS, axis=-1, length=qa_like.shape[-1])
    return dataclasses.replace(qa_like.unpack(), codes=codes)
