"""ZeroQuant-V2 — fine-grained W4A8 plus Low Rank Compensation (LoRC).

Yao, Wu, Li, Youn, He, "ZeroQuant-V2: Exploring Post-training Quantization in LLMs from
Comprehensive Study to Low Rank Compensation", arXiv 2303.08302.

* **Fine-grained weight quantization (FGQ)** — ``W[out, in]`` in groups of ``group_size``
  consecutive input channels, one scale (and zero point) per group, round to nearest (§4).
* **Activations** — 8-bit, dynamic per token (the ZeroQuant family's token-wise
  quantization, §3; ``methods.actquant``).
* **LoRC** (§5, the two steps of "Algorithm: LoRC"): the error ``E = W − Ŵ`` has the SVD
  ``E = U Σ Vᵀ``; keep ``Û = U_m Σ_m^{1/2}`` and ``V̂ = Σ_m^{1/2} V_mᵀ`` of rank ``m``
  (``lorc_rank``), so the weight is ``Ŵ + Û V̂``; ``Û`` and ``V̂`` are themselves quantized
  (``lorc_bits``, 8-bit per row: the paper reports that quantizing them costs nothing). The
  leaf is ``numerics.lowrank.LowRankCorrected``; its bits per weight count the factors.

Official code checked: the paper points to DeepSpeed (microsoft/DeepSpeed, its
``deepspeed/compression`` library and microsoft/DeepSpeedExamples ``compression/``), where the
released code covers the ZeroQuant family's weight / activation quantizers; we found no
stand-alone LoRC script in those repositories, so LoRC follows the paper's text.

Details as in the reference: group-wise weight scales, token-wise 8-bit activations, LoRC on
the RTN error with factors ``U_m Σ_m^{1/2}`` / ``Σ_m^{1/2} V_mᵀ`` and 8-bit factors; the paper's
default rank (8) for the factors.

Differences, on purpose: the weights are round-to-nearest (the paper also combines LoRC with
GPTQ; RTN isolates LoRC's effect); activations are symmetric (the shared quantizer of
``methods.actquant``), weights asymmetric with an integer zero point (as this project's
weight-only RTN; the paper studies both); groups may be ragged (SmolLM2's 576 width at g128).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jaxtyping import Array, Float

from methods.actquant import ActQuantConfig, act_quantizer
from methods.base import LayerResult, LayerStats, check_bits, check_group
from numerics.config import QuantConfig, rtn
from numerics.lowrank import lorc
from numerics.quantize import quantize

WEIGHT_BITS = (2, 3, 4, 8)
LORC_BITS = (4, 8, 16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZeroQuantV2Config:
    bits: int = 4  # weight bits
    group_size: int | None = 128  # FGQ group of input channels; None: one scale per row
    sym: bool = False  # False: unsigned codes + integer zero point
    ragged: bool = False  # allow a shorter last group
    scale_dtype: str = "float16"  # weight scales stored as fp16 (counted in bits per weight)
    act_bits: int = 8  # activation bits (16: weight-only)
    act_format: str = "int"  # "int" | "fp8_e4m3" | "fp8_e5m2" (methods.actquant)
    lorc_rank: int = 8  # m, the rank of the error's low-rank correction; 0: no LoRC
    lorc_bits: int = 8  # bits of the factors Û, V̂ (per-row symmetric); 16: float16 factors

    def __post_init__(self) -> None:
        check_bits(self.bits, WEIGHT_BITS, "ZeroQuant-V2 weight")
        check_group(self.group_size, "ZeroQuant-V2")
        if not isinstance(self.lorc_rank, int) or self.lorc_rank < 0:
            raise ValueError(f"ZeroQuant-V2: lorc_rank must be an int >= 0, got {self.lorc_rank}")
        check_bits(self.lorc_bits, LORC_BITS, "ZeroQuant-V2 LoRC factor")
        self.act_config()  # validates act_bits / act_format

    def weight_quant(self) -> QuantConfig:
        return rtn(
            self.bits,
            group_size=self.group_size,
            sym=self.sym,
            scale_dtype=self.scale_dtype,
            ragged=self.ragged,
        )

    def factor_quant(self) -> QuantConfig | None:
        """Per-row symmetric quantizer of the LoRC factors (None: fp16 factors)."""
        if self.lorc_bits == 16:
            return None
        return rtn(self.lorc_bits, group_size=None, sym=True, scale_dtype="float16")

    def act_config(self) -> ActQuantConfig:
        return ActQuantConfig(bits=self.act_bits, format=self.act_format, granularity="token")


def quantize_layer(
    W: Float[Array, "out in"], stats: LayerStats, cfg: ZeroQuantV2Config, *, key=None
) -> LayerResult:
    """FGQ round-to-nearest ``Ŵ`` (+ LoRC ``Û V̂`` when ``lorc_rank > 0``) and the linear's
    per-token activation quantizer."""
    del stats, key  # data-free: RTN weights, dynamic activations
    W_hat = quantize(W, cfg.weight_quant())
    leaf = W_hat
    if cfg.lorc_rank:
        rank = min(cfg.lorc_rank, *W.shape)
        leaf = lorc(W, W_hat, rank, cfg.factor_quant())
        if cfg.factor_quant() is None:  # float factors stored as fp16 (16 bits each)
            leaf = dataclasses.replace(
                leaf, U=leaf.U.astype(jnp.float16), V=leaf.V.astype(jnp.float16)
            )
    return LayerResult(leaf, act=act_quantizer(cfg.act_config(), who="ZeroQuant-V2"))
