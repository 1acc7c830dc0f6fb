"""Minifloat element formats ExMy (FP3 … FP8, E8M0), bit-exact with ml_dtypes.

A code is ``[sign][E exponent bits][M mantissa bits]`` (no sign bit when unsigned).
With exponent field ``f`` and mantissa field ``m``:

* normal (``f >= 1``):      ``(1 + m/2^M) · 2^(f − bias)``
* subnormal (``f == 0``):   ``(m/2^M) · 2^(1 − bias)``             (``subnormals=True``)
* no subnormals (``f == 0``, ``subnormals=False``): the exponent field 0 holds normals
  ``(1 + m/2^M) · 2^(−bias)`` like every other binade, except ``m == 0`` which is ±0.
  No code is wasted; the open interval ``(0, 2^−bias·(1 + 2^−M))`` holds no value.

Special-value policies (``special``), named after ml_dtypes' suffixes:

* ``"ieee"`` — exponent all ones: ``m == 0`` is ±inf, ``m != 0`` NaN (float8_e5m2).
* ``"fn"``   — finite; only exponent-and-mantissa all ones is NaN (float8_e4m3fn).
* ``"none"`` — every code is a finite number (OCP MX float4_e2m1fn, float6_e2m3fn, float6_e3m2fn).
* ``"fnu"``  — unsigned, no zero, all ones is NaN, every other exponent field (0 included)
  is normal (float8_e8m0fnu: code c is ``2^(c − 127)``).

Two roundings, both arithmetic on the float32 bit pattern (XLA on CPU flushes float32
subnormals in float arithmetic and comparisons, so no float op touches the input):

* ``encode`` — the quantizer: nearest value, ties to the even mantissa, saturating at
  ±``max_abs`` (never inf or NaN from a number; ±inf → ±max; NaN → the NaN code, or code 0
  where the format has none). With ``M == 0`` there is no mantissa bit and ties use the
  implicit bit as ml_dtypes does: a tie between ``2^t`` and ``2^(t+1)`` goes up, a tie
  between 0 and the smallest value goes to 0. Unsigned formats map negatives to code 0.
* ``cast`` — ml_dtypes' own float32 → dtype conversion (``ConvertImpl`` in ml_dtypes 0.6.0
  ``float8.h``), including its overflow / NaN policy: overflow gives inf (``ieee``), NaN
  (``fn``, ``fnu``) or ±max (``none``); NaN gives the quiet NaN with the input's sign
  (``ieee`` 0x7E/0xFE, ``fn`` 0x7F/0xFF), for ``none`` the code of ∓0 (ml_dtypes' MX
  types define quiet_NaN as −0 and negate it for +NaN), for ``fnu`` 0xFF; E8M0 maps ±0 and
  negatives to NaN and rounds linearly (``1.5·2^t → 2^(t+1)``) on a lattice that treats
  code 0 as if it were zero, so ``(2^−127, 1.5·2^−127)`` casts to ``2^−126`` although
  ``2^−127`` is nearer (``encode`` gives the nearer one). Formats without an ml_dtypes twin
  cast with the same rules on their own grid; unsigned formats cast negatives to NaN (or 0).

OCP Microscaling Formats (MX) v1.0 spec, sec. 5.3 (FP8/FP6/FP4 element types, E8M0);
"FP8 Formats for Deep Learning", arXiv 2209.05433 (E4M3 / E5M2).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jaxtyping import Array, Float, UInt8

from numerics.format_base import MAX_BITS, Format

POLICIES = ("ieee", "fn", "none", "fnu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FloatFormat(Format):
    """Minifloat ExMy (see the module docstring for the value and policy definitions)."""

    exp_bits: int  # E >= 1
    man_bits: int  # M >= 0
    bias: int | None = None  # exponent bias; None -> 2^(E-1) - 1
    signed: bool = True  # sign bit present (False for e8m0)
    subnormals: bool = True  # exponent field 0 is subnormal; False: normals there, m=0 is ±0
    special: str = "none"  # "ieee" | "fn" | "none" | "fnu"

    def __post_init__(self):
        for f in ("exp_bits", "man_bits"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"FloatFormat: {f} must be an int, got {type(v).__name__}")
        if self.exp_bits < 1 or self.man_bits < 0:
            raise ValueError(
                f"FloatFormat: need exp_bits >= 1 and man_bits >= 0, got "
                f"e{self.exp_bits}m{self.man_bits}"
            )
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exp_bits - 1) - 1)
        elif not isinstance(self.bias, (int, np.integer)) or isinstance(self.bias, bool):
            raise TypeError(f"FloatFormat: bias must be an int, got {type(self.bias).__name__}")
        if not 1 <= self.bits <= MAX_BITS:
            raise ValueError(f"FloatFormat: sign + E + M = {self.bits} bits, must be 1..{MAX_BITS}")
        if self.special not in POLICIES:
            raise ValueError(
                f"FloatFormat: special must be one of {POLICIES}, got {self.special!r}"
            )
        if self.special == "fnu" and (self.signed or self.subnormals):
            raise ValueError("FloatFormat: special='fnu' needs signed=False and subnormals=False")
        if self.special == "ieee" and self.man_bits < 1:
            raise ValueError("FloatFormat: special='ieee' needs man_bits >= 1 (NaN codes)")
        v = self.finite_values()
        if not np.any(v > 0):
            raise ValueError(f"FloatFormat {self.name}: no positive finite value")
        nz = np.abs(v[v != 0])
        if nz.max() > float(np.finfo(np.float32).max) or not np.array_equal(
            nz.astype(np.float32).astype(np.float64), nz
        ):
            raise ValueError(f"FloatFormat {self.name}: values not exact in float32 (bias?)")

    # ------------------------------------------------------------------ layout

    @property
    def bits(self) -> int:
        return int(self.signed) + self.exp_bits + self.man_bits

    @property
    def name(self) -> str:
        E, M = self.exp_bits, self.man_bits
        if (E, M, self.signed, self.special) == (8, 0, False, "fnu") and self.bias == 127:
            return "e8m0"
        s = f"{'' if self.signed else 'u'}fp{self.bits}_e{E}m{M}"
        if self.bias != 2 ** (E - 1) - 1:
            s += f"_b{self.bias}"
        if self.special != _default_special(E, M, self.signed):
            s += f"_{self.special}"
        if not self.subnormals and self.special != "fnu":
            s += "_nosub"
        return s

    @property
    def _sign_bit(self) -> int:
        return 1 << (self.exp_bits + self.man_bits) if self.signed else 0

    @property
    def _all_ones(self) -> int:
        return (1 << (self.exp_bits + self.man_bits)) - 1

    @property
    def _max_code(self) -> int:
        """Magnitude code of the largest finite value."""
        if self.special == "ieee":
            return ((2**self.exp_bits - 1) << self.man_bits) - 1
        return self._all_ones - (self.special in ("fn", "fnu"))

    @property
    def _nan_code(self) -> int | None:
        """Quiet-NaN magnitude code (ml_dtypes' quiet_NaN), None when there is none."""
        if self.special == "ieee":
            return ((2**self.exp_bits - 1) << self.man_bits) | (1 << (self.man_bits - 1))
        return None if self.special == "none" else self._all_ones

    @property
    def _emin(self) -> int:
        """Exponent of the lowest binade of the rounding lattice (see ``_lattice``)."""
        return 1 - self.bias if self.subnormals else -self.bias

    # ------------------------------------------------------------------ values

    def values(self) -> np.ndarray:
        E, M = self.exp_bits, self.man_bits
        c = np.arange(2**self.bits)
        mag = c & self._all_ones
        f, m = mag >> M, mag & (2**M - 1)
        normal = np.ldexp(2.0**M + m, f - self.bias - M)
        if self.subnormals:
            v = np.where(f == 0, np.ldexp(m.astype(np.float64), 1 - self.bias - M), normal)
        else:
            v = np.where(mag == 0, 0.0, normal) if self.special != "fnu" else normal
        if self.special == "ieee":
            top = f == 2**E - 1
            v = np.where(top & (m == 0), np.inf, np.where(top, np.nan, v))
        elif self.special in ("fn", "fnu"):
            v = np.where(mag == self._all_ones, np.nan, v)
        neg = (c & self._sign_bit) != 0
        return np.where(neg, -v, v).astype(np.float64)

    @property
    def max_abs(self) -> float:
        return float(np.max(np.abs(self.finite_values())))

    @functools.cached_property
    def _table(self) -> np.ndarray:
        return self.values().astype(np.float32)  # exact: __post_init__ checked the range

    # ------------------------------------------------------------------ array API

    def decode(self, codes: UInt8[Array, "*s"]) -> Float[Array, "*s"]:
        """float32 value of each code (±inf / NaN codes give ±inf / NaN; codes
        outside ``[0, 2**bits)`` give NaN)."""
        codes = jnp.asarray(codes)
        if not jnp.issubdtype(codes.dtype, jnp.integer):
            raise TypeError(f"{self.name}.decode: codes must be integers, got {codes.dtype}")
        return jnp.take(
            jnp.asarray(self._table), codes.astype(jnp.int32), mode="fill", fill_value=np.nan
        )

    def encode(self, y: Float[Array, "*s"]) -> UInt8[Array, "*s"]:
        """Quantizer: nearest value, ties to even, saturating at ±max_abs (module docstring).
        The sign is kept, so a negative input that rounds to zero gives −0 (as ``cast``)."""
        return _encode(self, _as_float(y, self.name, "encode"))

    def cast(self, x: Float[Array, "*s"]) -> UInt8[Array, "*s"]:
        """float32 → code exactly like ml_dtypes' ``x.astype(dtype)`` (module docstring).
        Other float dtypes are converted to float32 first."""
        return _cast(self, _as_float(x, self.name, "cast"))

    def bracket(self, y: Float[Array, "*s"]) -> tuple[Float[Array, "*s"], Float[Array, "*s"]]:
        """Neighbours ``lo <= clip(y) <= hi`` (equal on the grid); NaN gives NaN."""
        return _bracket(self, _as_float(y, self.name, "bracket"))


def _as_float(y, name: str, who: str) -> Float[Array, "*s"]:
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise TypeError(f"{name}.{who}: expected a floating-point array, got {y.dtype}")
    return y.astype(jnp.float32)


# --------------------------------------------------------------------------- bit-level core


def _unpack(x: Float[Array, "*s"]):
    """float32 → (sign, e, sig, |bits|): ``|x| = sig · 2^(e − 23)`` with ``sig ∈ [2^23, 2^24)``
    (float32 subnormals normalised with a count of leading zeros)."""
    b = lax.bitcast_convert_type(x, jnp.int32)
    a = b & 0x7FFFFFFF
    e32, frac = a >> 23, a & 0x7FFFFF
    p = 31 - lax.clz(frac)  # position of a subnormal's leading one (-1 when frac == 0)
    sub = e32 == 0
    e = jnp.where(sub, p - 149, e32 - 127)
    sig = jnp.where(sub, frac << jnp.clip(23 - p, 0, 31), frac | 0x800000)
    return b < 0, e, sig, a


def _lattice(e, sig, *, M: int, emin: int):
    """Truncate ``|x|`` onto the lattice {2^t (1 + k/2^M), t >= emin} ∪ {k 2^(emin−M)}.

    Returns ``(idx, q, rnd, sticky)``: ``idx`` the index of the lattice point at or below
    ``|x|`` (0 ↔ 0, ``2^M`` ↔ ``2^emin``; increasing with the value), ``q`` its mantissa with
    the implicit bit, ``rnd`` the first dropped bit and ``sticky`` whether any later is set."""
    te = jnp.maximum(e, emin)
    s = jnp.minimum(23 - M + te - e, 26)  # >= 16; 26 drops all 24 bits, rounding to 0
    q = sig >> s
    rnd = (sig >> (s - 1)) & 1
    sticky = (sig & ((1 << (s - 1)) - 1)) != 0
    return ((te - emin) << M) + q, q, rnd, sticky


def _rne(e, sig, *, M: int, emin: int, lowest: str):
    """Magnitude code of ``|x|`` rounded to nearest-even, unbounded above (callers clamp or
    flag overflow). ``lowest`` says what the exponent field 0 holds: ``"sub"`` subnormals
    (lattice index = code), ``"zero"`` normals and ±0, ``"fnu"`` normals only."""
    idx, q, rnd, sticky = _lattice(e, sig, M=M, emin=emin)
    idx = idx + (rnd.astype(bool) & (sticky | ((q & 1) == 1))).astype(jnp.int32)
    if lowest == "sub":
        return idx
    # Normals only: idx 2^M is 2^emin = 2^-bias, which is code 0 (fnu) or not representable
    # (±0 in its place). At or below it the candidates are 0 and code 1 = (2^M + 1)·2^(emin-M);
    # there te == emin, so (q, rnd, sticky) count units of 2^(emin-M).
    if lowest == "fnu":
        return jnp.maximum(idx - 2**M, 0)
    twice = 2 * q + rnd
    up = (twice > 2**M + 1) | ((twice == 2**M + 1) & sticky)
    return jnp.where(idx > 2**M, idx - 2**M, up.astype(jnp.int32))


def _lowest(fmt: FloatFormat) -> str:
    return "sub" if fmt.subnormals else ("fnu" if fmt.special == "fnu" else "zero")


@functools.partial(jax.jit, static_argnames="fmt")
def _encode(fmt: FloatFormat, y):
    neg, e, sig, a = _unpack(y)
    rne = _rne(e, sig, M=fmt.man_bits, emin=fmt._emin, lowest=_lowest(fmt))
    mag = jnp.minimum(rne, fmt._max_code)  # ±inf saturate here too
    mag = jnp.where(a == 0, 0, mag)  # ±0 -> ±0 (fnu: the smallest value, code 0)
    code = jnp.where(neg, mag | fmt._sign_bit, mag) if fmt.signed else jnp.where(neg, 0, mag)
    nan = 0 if fmt._nan_code is None else (fmt._nan_code | jnp.where(neg, fmt._sign_bit, 0))
    return jnp.where(a > 0x7F800000, nan, code).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames="fmt")
def _cast(fmt: FloatFormat, x):
    neg, e, sig, a = _unpack(x)
    sb, nan = fmt._sign_bit, fmt._nan_code
    if fmt.special == "fnu":  # ml_dtypes rounds on the subnormal lattice, code 0 as if zero
        mag = _rne(e, sig, M=fmt.man_bits, emin=1 - fmt.bias, lowest="sub")
    else:
        mag = _rne(e, sig, M=fmt.man_bits, emin=fmt._emin, lowest=_lowest(fmt))
    over = {"ieee": fmt._max_code + 1, "fn": nan, "none": fmt._max_code, "fnu": nan}[fmt.special]
    mag = jnp.where((mag > fmt._max_code) | (a == 0x7F800000), over, mag)  # overflow, ±inf
    mag = jnp.where(a == 0, 0 if fmt.special != "fnu" else nan, mag)
    if fmt.signed:
        code = jnp.where(neg, mag | sb, mag)
    else:
        code = jnp.where(neg & (a != 0), 0 if nan is None else nan, mag)
    if nan is not None:
        nan_code = (nan | jnp.where(neg, sb, 0)) if fmt.signed else nan
    else:  # ml_dtypes' MX types: quiet_NaN is -0, negated for a negative NaN
        nan_code = jnp.where(neg, 0, sb)
    return jnp.where(a > 0x7F800000, nan_code, code).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames="fmt")
def _bracket(fmt: FloatFormat, y):
    M = fmt.man_bits
    neg, e, sig, a = _unpack(y)
    idx, _, rnd, sticky = _lattice(e, sig, M=M, emin=fmt._emin)
    inexact = (rnd.astype(bool) | sticky).astype(jnp.int32)
    if _lowest(fmt) == "sub":
        lo = idx
        hi = idx + inexact
    elif fmt.special == "fnu":  # below 2^-bias: clipped to the smallest value
        lo = jnp.maximum(idx - 2**M, 0)
        hi = jnp.where(idx < 2**M, 0, lo + inexact)
    else:  # below code 1 the neighbours are 0 and code 1
        low = idx <= 2**M
        lo = jnp.where(low, 0, idx - 2**M)
        hi = jnp.where(low, 1, lo + inexact)
    lo, hi = (jnp.where(a == 0, 0, jnp.minimum(c, fmt._max_code)) for c in (lo, hi))
    table = jnp.asarray(fmt._table)
    vlo, vhi = table[lo], table[hi]
    if fmt.signed:
        vlo, vhi = jnp.where(neg, -vhi, vlo), jnp.where(neg, -vlo, vhi)
    else:
        vlo, vhi = jnp.where(neg, table[0], vlo), jnp.where(neg, table[0], vhi)
    isnan = a > 0x7F800000
    return jnp.where(isnan, jnp.nan, vlo), jnp.where(isnan, jnp.nan, vhi)


# --------------------------------------------------------------------------- names

# Our standard formats and their ml_dtypes twins (``cast`` is bit-exact with these).
ML_DTYPES = {
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "e8m0": ml_dtypes.float8_e8m0fnu,
}

_ALIASES = {
    "ue8m0": "e8m0",
    "e8m0fnu": "e8m0",
    "fp8_e8m0": "e8m0",
    "ufp8_e8m0": "e8m0",
    "float4_e2m1fn": "fp4_e2m1",
    "float6_e2m3fn": "fp6_e2m3",
    "float6_e3m2fn": "fp6_e3m2",
    "float8_e4m3fn": "fp8_e4m3",
    "float8_e5m2": "fp8_e5m2",
    "float8_e8m0fnu": "e8m0",
    "float8_e4m3": "fp8_e4m3_ieee",  # ml_dtypes' IEEE-style E4M3 (has inf)
    "float8_e3m4": "fp8_e3m4",
}

_NAME = re.compile(r"(u?)fp(\d+)_e(\d+)m(\d+)((?:_[a-z0-9-]+)*)")


def _default_special(E: int, M: int, signed: bool) -> str:
    """Policy a bare name gets: ml_dtypes' for the standard 8-bit formats (e4m3 → fn, e5m2 →
    ieee, unsigned e8m0 → fnu), IEEE-like (as ml_dtypes' float8_e3m4) for other 7/8-bit
    formats with a mantissa, and no inf/NaN (as the MX FP4/FP6 types) otherwise."""
    if (E, M, signed) == (8, 0, False):
        return "fnu"
    if signed and (E, M) == (4, 3):
        return "fn"
    return "ieee" if int(signed) + E + M >= 7 and M >= 1 else "none"


def get_minifloat(name: str) -> FloatFormat:
    """Parse ``[u]fp<k>_e<E>m<M>[_b<bias>][_ieee|_fn|_none|_fnu][_nosub]`` (``k = sign + E + M``)
    and ``e8m0``; also the ml_dtypes names (``float8_e4m3fn``, …). Examples: ``fp4_e2m1``,
    ``fp6_e2m3``, ``fp6_e3m2``, ``fp8_e4m3``, ``fp8_e5m2``, ``fp4_e3m0`` (QLoRA's FP4 variant),
    ``fp3_e1m1`` / ``fp3_e2m0`` (BitMoD-style FP3), ``fp4_e2m1_nosub``, ``fp8_e4m3_b8``.
    Raises ValueError for anything else."""
    if not isinstance(name, str):
        raise TypeError(f"minifloat name must be a str, got {type(name).__name__}")
    s = _ALIASES.get(name.lower().strip(), name.lower().strip())
    if s == "e8m0":
        return FloatFormat(exp_bits=8, man_bits=0, signed=False, subnormals=False, special="fnu")
    mt = _NAME.fullmatch(s)
    if mt is None:
        raise ValueError(f"not a minifloat name: {name!r} (expected e.g. 'fp4_e2m1', 'e8m0')")
    signed = mt.group(1) == ""
    k, E, M = int(mt.group(2)), int(mt.group(3)), int(mt.group(4))
    if k != int(signed) + E + M:
        raise ValueError(f"{name!r}: fp{k} but sign + E + M = {int(signed) + E + M} bits")
    kw: dict = {"special": _default_special(E, M, signed) if E >= 1 else "none"}
    for suf in filter(None, mt.group(5).split("_")):
        if suf in POLICIES:
            kw["special"] = suf
        elif suf == "nosub":
            kw["subnormals"] = False
        elif re.fullmatch(r"b-?\d+", suf):
            kw["bias"] = int(suf[1:])
        else:
            raise ValueError(f"{name!r}: unknown suffix {suf!r} (b<bias>, {POLICIES}, nosub)")
    if kw["special"] == "fnu":
        kw["subnormals"] = False
    return FloatFormat(exp_bits=E, man_bits=M, signed=signed, **kw)
