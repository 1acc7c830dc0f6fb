"""ZeroQuant-FP — W4A8 with floating-point formats: FP8 activations, INT4 or FP4 weights.

Wu, Yao, He, "ZeroQuant-FP: A Leap Forward in LLMs Post-Training W4A8 Quantization Using
Floating-Point Formats", arXiv 2307.09782.

* **Activations** — FP8 E4M3 (or INT8 for the comparison), dynamic per token: the scale maps
  each token's ``max|x|`` to the format's largest finite value (``methods.actquant``).
* **Weights** — fine-grained groups of ``group_size`` input channels, INT4 (round to nearest)
  or FP4 E2M1 (round to the nearest E2M1 value of ``w / s`` with ``s = max|w| / 6``).
* **Scale constraint for FP4 → FP8 casting** (§4): an FP4 weight is cast to FP8 before the
  FP8 GEMM; with arbitrary group scales the cast is a multiply + re-round, with power-of-two
  scales it is an exponent shift and exact (E2M1's one mantissa bit fits E4M3's three). Two
  constraints, ``pow2_scale``:

  - ``"m1"`` — each group's scale rounded *up* to a power of two, ``s̃ᵢ = 2^⌈log₂ sᵢ⌉``;
  - ``"m2"`` — a real per-row scale ``s_row = maxᵢ sᵢ`` and power-of-two ratios,
    ``s̃ᵢ = s_row · 2^{−kᵢ}``, ``kᵢ = ⌊log₂(s_row / sᵢ)⌋`` (so ``s̃ᵢ ≥ sᵢ``).

  In both, ``kᵢ`` (the exponent shift relative to the row's largest group scale) is capped at
  :data:`MAX_SHIFT` = 8, so that every dequantized weight divided by the row's largest scale
  is an exact FP8 E4M3 number (E2M1's smallest magnitude 0.5 · 2^{−8} is E4M3's smallest
  subnormal 2^{−9}). Rounding up keeps ``max|w| / s̃ ≤ 6``: nothing clips, the grid only
  coarsens (by < 2×).
* **LoRC** (ZeroQuant-V2, arXiv 2303.08302; the paper adds it in §5): optional, ``lorc_rank``,
  through the shared ``numerics.lowrank.lorc``.

Official code checked: microsoft/DeepSpeed ``deepspeed/ops/fp_quantizer/quantize.py``
(``FP_Quantize``: group-wise FP quantization, ``q_bits`` 8 / 6 / 4 with 3 / 2 / 1 mantissa bits,
i.e. E4M3, E3M2, E2M1). The paper's evaluation scripts and its scale constraints are not in
that code, so M1 / M2 follow the paper's text as we read it (M2's formula unverified).

Details as in the reference: E4M3 activations per token, E2M1 weights with group scales,
scales kept at or above the real one (no clipping).

Differences, on purpose: weights are round-to-nearest (the paper applies GPTQ first; RTN
isolates the format's effect); the stored scales are fp16 in every variant (M2 could store a
real per-row scale plus a few-bit exponent per group — we count 16 bits per group, an upper
bound); the shift cap (8) is ours, from E4M3's range.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Float

from methods.actquant import ActQuantConfig, act_quantizer
from methods.base import LayerResult, LayerStats, check_bits, check_group, group_view, ungroup
from numerics.config import QuantConfig, rtn
from numerics.formats import get_format
from numerics.lowrank import lorc
from numerics.qarray import QArray
from numerics.quantize import check_input, quantize

WEIGHT_FORMATS = ("int", "fp")
POW2 = ("none", "m1", "m2")
MAX_SHIFT = 8  # largest exponent shift of a group scale below the row's largest (E4M3 range)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZeroQuantFPConfig:
    bits: int = 4  # weight bits (4: INT4 / FP4 E2M1)
    weight_format: str = "fp"  # "fp" (E2M1) | "int" (INT4, zero point unless sym)
    group_size: int | None = 128  # input channels per weight scale; None: one per row
    sym: bool = False  # INT weights only: False → unsigned codes + integer zero point
    ragged: bool = False  # allow a shorter last group
    scale_dtype: str = "float16"  # weight scales stored as fp16
    pow2_scale: str = "none"  # FP weights: "none" | "m1" | "m2" (the FP4 → FP8 constraint)
    act_bits: int = 8  # activation bits (16: weight-only)
    act_format: str = "fp8_e4m3"  # "fp8_e4m3" (the paper) | "int" (the comparison)
    lorc_rank: int = 0  # optional LoRC rank (0: off)
    lorc_bits: int = 8  # LoRC factors' bits (per-row symmetric INT)

    def __post_init__(self) -> None:
        check_bits(self.bits, (4,), "ZeroQuant-FP weight")
        check_group(self.group_size, "ZeroQuant-FP")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"ZeroQuant-FP: weight_format {self.weight_format!r} not in "
                             f"{WEIGHT_FORMATS}")  # fmt: skip
        if self.pow2_scale not in POW2:
            raise ValueError(f"ZeroQuant-FP: pow2_scale {self.pow2_scale!r} not in {POW2}")
        if self.pow2_scale != "none" and self.weight_format != "fp":
            raise ValueError("ZeroQuant-FP: pow2_scale constrains FP4 weights (weight_format='fp')")
        if not isinstance(self.lorc_rank, int) or self.lorc_rank < 0:
            raise ValueError(f"ZeroQuant-FP: lorc_rank must be an int >= 0, got {self.lorc_rank}")
        check_bits(self.lorc_bits, (8,), "ZeroQuant-FP LoRC factor")
        self.act_config()  # validates act_bits / act_format

    @classmethod
    def for_format(cls, bits: int, group_size: int | None, **kw) -> ZeroQuantFPConfig:
        """The paper's W4 formats only: any requested weight width maps to 4 bits."""
        del bits
        return cls(group_size=group_size, **kw)

    def weight_quant(self) -> QuantConfig:
        if self.weight_format == "int":
            return rtn(self.bits, group_size=self.group_size, sym=self.sym,
                       scale_dtype=self.scale_dtype, ragged=self.ragged)  # fmt: skip
        gran = {"granularity": "channel"}
        if self.group_size is not None:
            gran = {"granularity": "group", "group_size": self.group_size, "ragged": self.ragged}
        return QuantConfig(format="fp4_e2m1", scale_dtype=self.scale_dtype, **gran)

    def act_config(self) -> ActQuantConfig:
        return ActQuantConfig(bits=self.act_bits, format=self.act_format, granularity="token")


def pow2_scales(s: Float[Array, "out ng"], method: str) -> Float[Array, "out ng"]:
    """The scale constraint (module docstring): M1 / M2 power-of-two scales ``s̃ ≥ s``, each
    within ``2^{-MAX_SHIFT}`` of its row's largest; zero scales (all-zero groups) stay zero."""
    if method not in ("m1", "m2"):
        raise ValueError(f"pow2_scales: method {method!r} not 'm1' or 'm2'")
    s = s.astype(jnp.float32)
    pos = s > 0
    safe = jnp.where(pos, s, 1.0)
    if method == "m1":
        e = jnp.ceil(jnp.log2(safe))
        top = jnp.max(jnp.where(pos, e, -jnp.inf), axis=-1, keepdims=True)
        e = jnp.maximum(e, top - MAX_SHIFT)
        out = jnp.exp2(e)
    else:
        row = jnp.max(s, axis=-1, keepdims=True)
        k = jnp.floor(jnp.log2(jnp.where(row > 0, row, 1.0) / safe))
        out = row * jnp.exp2(-jnp.clip(k, 0, MAX_SHIFT))
    return jnp.where(pos, out, 0.0)


def quantize_weight(W: Float[Array, "out in"], cfg: ZeroQuantFPConfig) -> QArray:
    """INT4 / FP4 group quantization of ``W``; with ``pow2_scale`` the FP4 scales constrained
    (the codes re-rounded on the constrained grid)."""
    check_input(W, "ZeroQuant-FP")
    qa = quantize(W, cfg.weight_quant())
    if cfg.pow2_scale == "none":
        return qa
    g = W.shape[1] if cfg.group_size is None else cfg.group_size
    s = pow2_scales(qa.scale_array(), cfg.pow2_scale).astype(qa.scale.dtype)
    fmt = get_format("fp4_e2m1")
    Wg = group_view(W, g, ragged=cfg.ragged, who="ZeroQuant-FP")
    sb = s.astype(jnp.float32)[..., None]
    y = jnp.where(sb > 0, Wg / jnp.where(sb > 0, sb, 1.0), 0.0)
    codes = ungroup(fmt.encode(y), W.shape[1])
    return dataclasses.replace(qa, codes=codes, scale=s)


def quantize_layer(
    W: Float[Array, "out in"], stats: LayerStats, cfg: ZeroQuantFPConfig, *, key=None
) -> LayerResult:
    del stats, key  # data-free: RTN weights, dynamic activations
    W_hat = quantize_weight(W, cfg)
    leaf = W_hat
    if cfg.lorc_rank:
        factor = rtn(cfg.lorc_bits, group_size=None, sym=True, scale_dtype="float16")
        leaf = lorc(W, W_hat, min(cfg.lorc_rank, *W.shape), factor)
    return LayerResult(leaf, act=act_quantizer(cfg.act_config(), who="ZeroQuant-FP"))
