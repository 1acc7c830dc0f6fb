"""The plain weight-and-activation baseline: RTN weights + the shared activation quantizer.

"Plain W4A8" of the W+A papers (DGQ arXiv 2310.04836 Table 1's "W4A8 RTN" rows, MixLLM
arXiv 2412.14590's RTN baselines): every block linear round-to-nearest (``methods.rtn``'s
format: asymmetric INT``bits`` in groups of ``group_size`` with float16 scales) and its input
fake-quantized at run time by ``methods.actquant`` (dynamic per-token INT8 by default). No
calibration, no search, no smoothing: the floor the W+A methods must beat at equal bits.
"""

from __future__ import annotations

import dataclasses

from jaxtyping import Array, Float

from methods.actquant import ActQuantConfig, act_quantizer
from methods.base import LayerResult, LayerStats, Method, check_bits, check_group, register
from methods.walk import quantize_sequential
from numerics.config import rtn
from numerics.quantize import quantize


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTNActConfig:
    bits: int = 4  # weight bits
    group_size: int | None = 128  # None: one scale per output channel
    sym: bool = False  # False: unsigned codes + zero point
    ragged: bool = False  # a shorter last group when group_size does not divide in-features
    act_bits: int = 8  # activation bits (16: float)
    act_granularity: str = "token"  # "token" (dynamic per-token) | "tensor" (dynamic per-tensor)

    def __post_init__(self) -> None:
        check_bits(self.bits, (2, 3, 4, 8), "RTN W+A")
        check_group(self.group_size, "RTN W+A")
        self.act_config()  # bad activation settings fail here, naming the field

    def act_config(self) -> ActQuantConfig:
        return ActQuantConfig(bits=self.act_bits, granularity=self.act_granularity)


def quantize_layer(
    W: Float[Array, "out in"], stats: LayerStats, cfg: RTNActConfig, *, key=None
) -> LayerResult:
    del stats, key  # data-free
    how = rtn(
        cfg.bits, group_size=cfg.group_size, sym=cfg.sym, ragged=cfg.ragged, scale_dtype="float16"
    )
    return LayerResult(quantize(W, how), act=act_quantizer(cfg.act_config(), who="RTN W+A"))


def quantize_model(params, model_cfg, calib_tokens, cfg: RTNActConfig, **kw):
    return quantize_sequential(params, model_cfg, calib_tokens, quantize_layer, cfg, needs=(), **kw)


METHOD = register(
    Method(
        name="rtn_act",
        kind="weight_act",
        config=RTNActConfig,
        quantize_layer=quantize_layer,
        quantize_model=quantize_model,
        paper="baseline",
        needs=(),
    )
)
