"""Activation quantizers of the weight-and-activation family (one copy for every W+A method).

A linear's input ``x [..., d]`` is fake-quantized at run time by the callable
:func:`act_quantizer` returns (it goes into ``LayerResult.act``, then into the result's
``Hooks.act_quant`` through ``methods.hooks.act_hooks``). The granularities are the ones the
papers compare (SmoothQuant arXiv 2211.10438 Table 2, ZeroQuant arXiv 2206.01861 §4):

* ``"token"`` — dynamic per-token: each row's scale is ``max_j |x_j| / q_max``, computed at run
  time (SmoothQuant O2/O3, ZeroQuant, LLM.int8()'s vector-wise activations);
* ``"tensor"`` dynamic — one scale for the whole activation, computed at run time;
* ``"tensor"`` static — one scale calibrated once from the calibration inputs' per-channel
  ``act_absmax`` (``max_j max|X_j| / q_max``; SmoothQuant O1, the "naive W8A8" baseline).

Formats: ``"int"`` (signed narrow-symmetric INTb, ``q_max = 2^{b−1} − 1``) or the FP8 minifloats
``"fp8_e4m3"`` / ``"fp8_e5m2"`` (ZeroQuant-FP arXiv 2307.09782; the scale maps ``max|x|`` to the
format's largest finite value). ``bits=16`` means float (no quantizer).

LLM.int8()'s mixed-precision decomposition (arXiv 2208.07339 sec. 3.2, eq. 7): with
``outlier_threshold`` α (paper: 6.0) the feature columns of ``x`` holding any ``|x| ≥ α`` stay in
float and only the rest is quantized per token (the rows' scales are computed over the
non-outlier columns). Which columns are outliers is decided at run time, per sequence (over the
tokens axis ``-2``: the rows of one sequence's hidden-state matrix), as a mask over features, so
the quantizer stays traceable and the result does not depend on how sequences are batched.

The quantizer is an :class:`ActQuantizer` (a frozen, hashable record of its config and static
scale), so the int8 kernel path (``methods.int8_kernel``) can read which codes it produces.

Bad input: a static scale calibrated to zero or to a non-finite value (a dead or broken
channel set) is refused when the quantizer is built. At run time values beyond a static range
saturate to ±q_max (the documented behaviour of a static scale); NaN inputs propagate to NaN
outputs (never finite garbage) — the evaluation then reports a NaN loss.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jaxtyping import Array, Float

from numerics.config import QuantConfig
from numerics.formats import IntFormat, get_format
from numerics.quantize import fake_quant

FORMATS = ("int", "fp8_e4m3", "fp8_e5m2")
GRANULARITIES = ("token", "tensor")
INT_BITS = (4, 6, 8)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActQuantConfig:
    bits: int = 8  # activation bits; 16: float (no quantizer)
    format: str = "int"  # "int" | "fp8_e4m3" | "fp8_e5m2"
    granularity: str = "token"  # "token" (per-token) | "tensor" (per-tensor)
    static: bool = False  # "tensor" only: one scale calibrated from act_absmax, not at run time
    outlier_threshold: float | None = None  # LLM.int8(): columns with any |x| ≥ this stay float

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"activation format {self.format!r} not one of {FORMATS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"activation granularity {self.granularity!r} not one of {GRANULARITIES}"
            )
        if self.format == "int" and self.bits not in (*INT_BITS, 16):
            raise ValueError(f"activation bits={self.bits!r} not supported; choose {INT_BITS}")
        if self.format != "int" and self.bits not in (8, 16):
            raise ValueError(f"activation bits={self.bits!r}: {self.format} has 8 bits")
        if self.static and self.granularity != "tensor":
            raise ValueError("static activation scales are per tensor (granularity='tensor')")
        t = self.outlier_threshold
        if t is not None:
            if (
                isinstance(t, bool)
                or not isinstance(t, int | float)
                or not (math.isfinite(t) and t > 0)
            ):
                raise ValueError(f"outlier_threshold must be a positive finite number, got {t!r}")
            if self.granularity != "token" or self.static or self.format != "int":
                raise ValueError(
                    "the outlier decomposition (LLM.int8()) is for dynamic per-token INT "
                    "activations (granularity='token', static=False, format='int')"
                )

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def element_format(self):
        return (
            IntFormat(bits=self.bits, signed=True)
            if self.format == "int"
            else (get_format(self.format))
        )

    def quant_config(self) -> QuantConfig:
        """The ``numerics`` config of the dynamic quantizer (per token: one scale per row)."""
        gran = "channel" if self.granularity == "token" else "tensor"
        return QuantConfig(format=self.element_format(), granularity=gran, axis=-1)


def static_scale(cfg: ActQuantConfig, act_absmax: Float[Array, " d"], *, who: str) -> float:
    """``max_j act_absmax_j / q_max``; refuses a zero or non-finite calibration."""
    if act_absmax is None:
        raise ValueError(f"{who}: a static activation scale needs the act_absmax statistic")
    m = float(jnp.max(jnp.asarray(act_absmax, jnp.float32)))
    if not math.isfinite(m) or m <= 0.0:
        raise ValueError(
            f"{who}: the per-tensor static activation scale was calibrated to {m} (all inputs "
            "zero, a dead channel set, or non-finite calibration); it cannot quantize anything"
        )
    return m / float(cfg.element_format().finite_values()[-1])


def outlier_mask(x: Float[Array, "*b t d"], threshold: float) -> Array:
    """LLM.int8()'s outlier feature columns: ``True`` where any token of the sequence has
    ``|x| ≥ threshold`` in that feature (reduced over the tokens axis ``-2``; a 1-D ``x`` is one
    token). Shape ``[..., 1, d]`` (broadcasts against ``x``)."""
    big = jnp.abs(x) >= jnp.asarray(threshold, x.dtype)
    return jnp.any(big, axis=-2, keepdims=True) if x.ndim >= 2 else big


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActQuantizer:
    """The run-time fake quantizer of one linear's input: ``ActQuantizer(cfg, scale)(x)``.

    ``scale``: the static per-tensor scale (``cfg.static``), ``None`` for dynamic ones."""

    cfg: ActQuantConfig
    scale: float | None = None

    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        if cfg.static:
            fmt = cfg.element_format()
            s = jnp.float32(self.scale)
            y = x.astype(jnp.float32) / s
            q = fmt.decode(fmt.encode(y)) * s
            return jnp.where(jnp.isnan(y), y, q).astype(x.dtype)  # integer codes have no NaN
        how = cfg.quant_config()
        if cfg.outlier_threshold is None:
            return fake_quant(x, how).astype(x.dtype)
        mask = outlier_mask(x, cfg.outlier_threshold)
        rest = fake_quant(jnp.where(mask, jnp.zeros_like(x), x), how).astype(x.dtype)
        return jnp.where(mask, x, rest)


def act_quantizer(
    cfg: ActQuantConfig, act_absmax: Float[Array, " d"] | None = None, *, who: str = "act"
) -> ActQuantizer | None:
    """The run-time fake quantizer of one linear's input (``None`` for ``bits=16``)."""
    if not cfg.quantized:
        return None
    if not cfg.static:
        return ActQuantizer(cfg=cfg)
    return ActQuantizer(cfg=cfg, scale=static_scale(cfg, act_absmax, who=who))
