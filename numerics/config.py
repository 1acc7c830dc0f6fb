"""``QuantConfig``: how to quantize — format, granularity, range, rounding — one flat config.

Granularity is given by ``granularity`` and its two knobs; it resolves to a *block
shape* (one scale per block) by ``numerics.granularity.block_shape``:

=================  ======================================  ===============================
granularity        meaning (weights ``W[out, in]``)        activations ``X[..., tokens, d]``
=================  ======================================  ===============================
``"tensor"``       one scale for the whole array           per-tensor
``"channel"``      one scale per slice along ``axis``;     ``axis=-1``: per-token (dynamic:
                   ``axis=-1`` → per output channel,       the scale is computed at call
                   ``axis=0`` → per input channel          time)
``"group"``        groups of ``group_size`` along ``axis`` groups along the features
``"block"``        2-D (or N-D) tiles of ``block_shape``   —
=================  ======================================  ===============================

``axis`` is always the *reduction* axis: the axis along which elements share a scale.

``ragged=True`` lets ``group_size`` leave a remainder: the last group along ``axis`` is shorter
(e.g. SmolLM2's 576 input features in groups of 128: four of 128 and one of 64), with its scale
chosen from its own elements only — GPTQ's reference quantizes its last columns this way.
Without it a group size that does not divide the axis is an error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from numerics.formats import Format, IntFormat, get_format

Granularity = Literal["tensor", "channel", "group", "block"]
RangeMethod = Literal["minmax", "percentile", "mse", "absmean"]
Rounding = Literal["nearest", "stochastic"]
ScaleKind = Literal["float", "pow2"]

_SCALE_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Flat, frozen description of one quantizer. Defaults: symmetric per-channel RTN."""

    format: Format | str = "int8"  # element format or its name (numerics.formats.get_format)
    granularity: Granularity = "channel"  # see the module docstring
    axis: int = -1  # reduction axis for "channel" / "group"
    group_size: int = 128  # elements per group along ``axis`` ("group")
    ragged: bool = False  # "group": allow a shorter last group when group_size does not divide
    block_shape: tuple[int, ...] = ()  # tile shape ("block"); len 2 applies to the last two axes
    zero_point: bool = False  # asymmetric: x ≈ (q − z)·s with integer z (integer formats only)
    scale_kind: ScaleKind = "float"  # "pow2": shared power-of-two exponent (MX / BFP, E8M0)
    scale_dtype: str = "float32"  # storage dtype of float scales (papers count fp16)
    range: RangeMethod = "minmax"  # how a block's clipping range is chosen
    percentile: float = 99.9  # "percentile": percentile of |x| (or of x, low/high, with zero point)
    mse_grid: int = 100  # "mse": shrink factors 1 − i/grid …
    mse_max_shrink: float = 0.8  # … for i < max_shrink·grid (GPTQ's find_params defaults)
    mse_norm: float = 2.4  # "mse": error exponent p in Σ|Q(x) − x|^p (GPTQ uses 2.4)
    rounding: Rounding = "nearest"  # "nearest": ties to even / format rule; "stochastic": keyed

    def __post_init__(self):
        fmt = get_format(self.format)  # raises on unknown names
        object.__setattr__(self, "format", fmt)
        if self.granularity not in ("tensor", "channel", "group", "block"):
            raise ValueError(f"unknown granularity {self.granularity!r}")
        if self.granularity == "group" and (
            not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if self.ragged and self.granularity != "group":
            raise ValueError(
                f"ragged=True applies to granularity='group', not {self.granularity!r}"
            )
        if self.granularity == "block" and (
            not self.block_shape or any(int(b) < 1 for b in self.block_shape)
        ):
            raise ValueError(
                f"granularity='block' needs a positive block_shape, got {self.block_shape!r}"
            )
        if self.zero_point and not isinstance(fmt, IntFormat):
            raise ValueError(f"zero_point=True needs an integer format, got {fmt.name}")
        if self.zero_point and self.scale_kind == "pow2":
            raise ValueError("zero_point is not supported with power-of-two (MX/BFP) scales")
        if self.scale_kind == "pow2":
            emax = 2.0 ** math.floor(math.log2(fmt.max_abs))
            if emax not in fmt.finite_values():
                raise ValueError(
                    f"scale_kind='pow2' needs 2^emax = {emax:g} representable in {fmt.name} "
                    "(a shared exponent maps each block's max onto [2^emax, 2^(emax+1)))"
                )
        if self.range not in ("minmax", "percentile", "mse", "absmean"):
            raise ValueError(f"unknown range method {self.range!r}")
        if self.range == "absmean" and self.zero_point:
            raise ValueError(
                "range='absmean' is a symmetric rule (binary/ternary); drop zero_point"
            )
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if not (0.0 < self.mse_max_shrink < 1.0) or self.mse_grid < 1:
            raise ValueError("mse_max_shrink must be in (0, 1) and mse_grid >= 1")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"unknown rounding {self.rounding!r}")
        if self.scale_kind not in ("float", "pow2"):
            raise ValueError(f"unknown scale_kind {self.scale_kind!r}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(
                f"scale_dtype must be one of {_SCALE_DTYPES}, got {self.scale_dtype!r}"
            )

    @property
    def fmt(self) -> Format:
        return self.format  # type: ignore[return-value]

    def replace(self, **changes) -> QuantConfig:
        return dataclasses.replace(self, **changes)


def rtn(
    bits: int,
    *,
    group_size: int | None = None,
    sym: bool = True,
    axis: int = -1,
    ragged: bool = False,
    **kw,
) -> QuantConfig:
    """Round-to-nearest integer config as the weight-only papers write it: ``W{bits} g{group}``,
    symmetric (signed codes) or asymmetric (unsigned codes + zero point). ``ragged`` allows a
    shorter last group; per channel (``group_size=None``) there is no group to be ragged."""
    fmt = IntFormat(bits=bits, signed=sym)
    gran = "channel" if group_size is None else "group"
    return QuantConfig(
        format=fmt,
        granularity=gran,
        group_size=group_size or 128,
        zero_point=not sym,
        axis=axis,
        ragged=ragged and group_size is not None,
        **kw,
    )


def mx(name: str, *, axis: int = -1) -> QuantConfig:
    """OCP Microscaling v1.0 formats: 32 elements share one E8M0 power-of-two scale.

    ``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxfp6_e3m2``, ``mxfp6_e2m3``, ``mxfp4`` (E2M1), ``mxint8``."""
    elements = {
        "mxfp8_e4m3": "fp8_e4m3",
        "mxfp8_e5m2": "fp8_e5m2",
        "mxfp6_e3m2": "fp6_e3m2",
        "mxfp6_e2m3": "fp6_e2m3",
        "mxfp4": "fp4_e2m1",
        "mxint8": "int8",
    }
    if name not in elements:
        raise ValueError(f"unknown MX format {name!r}; known: {sorted(elements)}")
    return QuantConfig(
        format=elements[name], granularity="group", group_size=32, axis=axis, scale_kind="pow2"
    )


def block_fp(mantissa_bits: int, block: int = 32, *, axis: int = -1) -> QuantConfig:
    """Block floating point (BFP; arXiv 2310.05079, 2403.20137): a block of ``block`` elements
    shares one 8-bit exponent; each element is a ``mantissa_bits``-bit two's-complement
    integer mantissa (so BFP12 of 2403.20137, an 8-bit shared exponent with 4-bit
    mantissas, is ``block_fp(4)``)."""
    if block not in (8, 16, 32, 64, 128):
        raise ValueError(f"BFP block size must be one of 8/16/32/64/128, got {block}")
    return QuantConfig(
        format=IntFormat(bits=mantissa_bits, signed=True),
        granularity="group",
        group_size=block,
        axis=axis,
        scale_kind="pow2",
    )


def block_minifloat(element: str, block: int = 32, *, axis: int = -1) -> QuantConfig:
    """Block minifloat (arXiv 2310.05079): minifloat elements with a shared exponent bias
    (a power-of-two scale per block), e.g. ``block_minifloat("fp6_e3m2", 16)``."""
    if block not in (8, 16, 32, 64, 128):
        raise ValueError(f"block size must be one of 8/16/32/64/128, got {block}")
    return QuantConfig(
        format=element, granularity="group", group_size=block, axis=axis, scale_kind="pow2"
    )


def np_scale_dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}[name]
