"""Element number formats: the integer and table formats, and the name registry.

Every format follows the contract of :class:`numerics.format_base.Format` (``bits``,
``values()``, ``max_abs``, ``encode`` / ``decode``, ``bracket``, ``symmetric``; re-exported
here as ``numerics.formats.Format``).

This module holds the integer formats and the table formats (NormalFloat,
arbitrary sorted codebooks, binary, ternary, bipolar-INT). Minifloats (ExMy,
bit-exact with ml_dtypes) are in ``numerics.minifloat``; ``get_format`` parses
names such as ``"int4"``, ``"uint3"``, ``"nf4"``, ``"fp4_e2m1"``, ``"ternary"``.
Imports point one way: ``format_base`` <- ``minifloat`` <- ``formats``.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from numerics.format_base import MAX_BITS, Format
from numerics.minifloat import get_minifloat

__all__ = [
    "MAX_BITS",
    "Format",
    "IntFormat",
    "TableFormat",
    "binary_format",
    "bipolar_int",
    "codebook_format",
    "get_format",
    "normal_float",
    "ternary_format",
]

# --------------------------------------------------------------------------- integers


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntFormat(Format):
    """k-bit integers. Signed: two's complement codes; ``encode`` uses the narrow symmetric
    range ``[-(2^(k-1)-1), 2^(k-1)-1]`` (``max_abs = 2^(k-1)-1``), so the code of
    ``-2^(k-1)`` decodes but is never produced — sign symmetry holds even under clipping.
    Unsigned: values ``[0, 2^k-1]`` (asymmetric quantization with a zero point)."""

    bits: int  # 1..8
    signed: bool = True

    def __post_init__(self):
        _check_bits(self.bits, "IntFormat")
        if self.signed and self.bits == 1:
            raise ValueError(
                "IntFormat(bits=1, signed=True) has no symmetric range (max_abs would be 0); "
                "use binary_format() for ±1 codes, or IntFormat(bits=1, signed=False) "
                "with a zero point"
            )

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max_abs(self) -> float:
        return float(self.qmax)

    @property
    def symmetric(self) -> bool:
        return self.signed  # on the narrow range [-qmax, qmax] that absmax scaling uses

    @property
    def has_zero(self) -> bool:
        return True

    def values(self) -> np.ndarray:
        c = np.arange(2**self.bits)
        if self.signed:
            c = np.where(c >= 2 ** (self.bits - 1), c - 2**self.bits, c)
        return c.astype(np.float64)

    def finite_values(self) -> np.ndarray:
        """The values ``encode`` can produce: ``[qmin, qmax]``."""
        return np.arange(self.qmin, self.qmax + 1, dtype=np.float64)

    def encode(self, y):
        q = jnp.clip(jnp.round(y.astype(jnp.float32)), self.qmin, self.qmax).astype(jnp.int32)
        return jnp.bitwise_and(q, 2**self.bits - 1).astype(jnp.uint8)

    def decode(self, codes):
        c = codes.astype(jnp.int32)
        if self.signed:
            c = jnp.where(c >= 2 ** (self.bits - 1), c - 2**self.bits, c)
        return c.astype(jnp.float32)

    def bracket(self, y):
        yc = jnp.clip(y.astype(jnp.float32), self.qmin, self.qmax)
        lo = jnp.floor(yc)
        return lo, jnp.where(lo == yc, lo, lo + 1.0)


# --------------------------------------------------------------------------- table formats


@dataclasses.dataclass(frozen=True, kw_only=True)
class TableFormat(Format):
    """A format given by the value of each code (``table[code]``); NaN marks unused codes.

    The basis of NormalFloat, sorted codebooks, binary, ternary and bipolar-INT."""

    label: str
    table: tuple[float, ...]  # value of code i; len == 2**bits (pad with nan)
    bits: int

    def __post_init__(self):
        _check_bits(self.bits, "TableFormat")
        if len(self.table) != 2**self.bits:
            raise ValueError(
                f"{self.label}: table has {len(self.table)} entries, needs 2**{self.bits}"
            )
        if np.sum(np.isfinite(self.table)) < 2:
            raise ValueError(f"{self.label}: a format needs at least two finite values")

    @property
    def name(self) -> str:
        return self.label

    def values(self) -> np.ndarray:
        return np.asarray(self.table, dtype=np.float64)


def codebook_format(levels, *, label: str = "codebook") -> TableFormat:
    """Arbitrary sorted level set (non-uniform quantization, e.g. SqueezeLLM / k-means levels)."""
    lv = np.asarray(levels, dtype=np.float64)
    if lv.ndim != 1 or lv.size < 2:
        raise ValueError(f"codebook needs a 1-D array of at least 2 levels, got shape {lv.shape}")
    if not np.all(np.isfinite(lv)):
        raise ValueError("codebook levels must be finite")
    if np.any(np.diff(lv) <= 0):
        raise ValueError("codebook levels must be strictly increasing")
    bits = max(1, math.ceil(math.log2(lv.size)))
    _check_bits(bits, "codebook_format")
    table = tuple(lv.tolist()) + (float("nan"),) * (2**bits - lv.size)
    return TableFormat(label=label, table=table, bits=bits)


def normal_float(bits: int) -> TableFormat:
    """NF-k (QLoRA, arXiv 2305.14314, sec. 3 "4-bit NormalFloat"): quantiles of N(0,1)
    normalised to [-1, 1], asymmetric so that 0 is exactly representable: 2^(k-1)
    positive levels and 2^(k-1)-1 negative levels plus zero. The outermost quantile is
    taken at offset δ = ½(1 − 1/(2(2^k−1)) + 1 − 1/(2·2^k)) (= 0.9677083 for k = 4, the
    constant of bitsandbytes' ``create_normal_map``). Codes are in ascending value order."""
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"normal_float supports 2..8 bits, got {bits}")
    from scipy.stats import norm

    n = 2**bits
    delta = round(0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))), 7)  # 0.9677083 for k=4
    pos = norm.ppf(_linspace_f32(delta, 0.5, n // 2 + 1)[:-1])
    neg = -norm.ppf(_linspace_f32(delta, 0.5, n // 2)[:-1])
    # Like bitsandbytes: float32 linspace, quantiles cast to float32, normalised in float32
    # (this reproduces the 16 published NF4 constants bit for bit).
    v = np.sort(np.concatenate([pos, [0.0], neg])).astype(np.float32)
    v = v / np.max(np.abs(v))
    return TableFormat(label=f"nf{bits}", table=tuple(v.astype(np.float64).tolist()), bits=bits)


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """float32 linspace with torch's evaluation order (first half from ``start``,
    second half from ``stop``), so NF tables match bitsandbytes' float32 constants."""
    a, b = np.float32(start), np.float32(stop)
    step = (b - a) / np.float32(num - 1)
    i = np.arange(num, dtype=np.float32)
    return np.where(i < num // 2, a + i * step, b - (np.float32(num - 1) - i) * step).astype(
        np.float32
    )


def binary_format() -> TableFormat:
    """±1 codes (code 0 → −1, code 1 → +1); sign(0) := +1. With scale α = mean|w| per group
    this is the L2-optimal binarization α·sign(w) (XNOR-Net; PB-LLM arXiv 2310.00034)."""
    return TableFormat(label="binary", table=(-1.0, 1.0), bits=1)


def ternary_format() -> TableFormat:
    """{−1, 0, +1} in 2-bit codes (code 3 unused); with absmean scaling γ = mean|W| this is
    BitNet b1.58 / TriLM's RoundClip(W/γ, −1, 1) (arXiv 2402.17764, 2407.12327)."""
    return TableFormat(label="ternary", table=(0.0, 1.0, float("nan"), -1.0), bits=2)


def bipolar_int(bits: int) -> TableFormat:
    """Bipolar-INT (arXiv 2409.17870): value = Σ_i 2^i·b_i with b_i ∈ {−1, +1}, where bit i
    of the code is 1 iff b_i = +1. Values are the odd integers in [−(2^k−1), 2^k−1]; there
    is no zero. ``value = 2·code − (2^k − 1)``."""
    _check_bits(bits, "bipolar_int")
    c = np.arange(2**bits)
    return TableFormat(
        label=f"bipolar{bits}", table=tuple((2.0 * c - (2**bits - 1)).tolist()), bits=bits
    )


# --------------------------------------------------------------------------- names


def _check_bits(bits: int, who: str) -> None:
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool):
        raise TypeError(f"{who}: bits must be an int, got {type(bits).__name__}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{who}: bits must be in 1..{MAX_BITS}, got {bits}")


def get_format(spec: str | Format) -> Format:
    """Parse a format name: ``int1..8`` (signed), ``uint1..8``, ``nf2..nf8``, ``binary``,
    ``ternary``, ``bipolar1..8``, and minifloats such as ``fp4_e2m1``, ``fp8_e4m3``,
    ``fp6_e3m2``, ``e8m0`` (see ``numerics.minifloat.get_minifloat``)."""
    if isinstance(spec, Format):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"format must be a Format or a name, got {type(spec).__name__}")
    s = spec.lower().strip()
    for prefix, make in (
        ("uint", lambda b: IntFormat(bits=b, signed=False)),
        ("int", lambda b: IntFormat(bits=b, signed=True)),
        ("nf", normal_float),
        ("bipolar", bipolar_int),
    ):
        if s.startswith(prefix) and s[len(prefix) :].isdigit():
            return make(int(s[len(prefix) :]))
    if s == "binary":
        return binary_format()
    if s == "ternary":
        return ternary_format()
    try:
        return get_minifloat(s)
    except ValueError:
        pass
    raise ValueError(
        f"unknown format {spec!r}; known: int1..8, uint1..8, nf2..8, binary, ternary, "
        "bipolar1..8, fp<k>_e<E>m<M> minifloats (fp4_e2m1, fp6_e2m3, fp6_e3m2, fp8_e4m3, "
        "fp8_e5m2, ...), e8m0"
    )
