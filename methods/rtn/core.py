"""RTN — round-to-nearest, the baseline every weight-only paper compares against.

No calibration: each group of ``W[out, in]`` (groups along the input axis, or one per output
channel) gets its own scale (and zero point when asymmetric) and every weight is rounded to
the nearest grid point. Optional MSE clip search (GPTQ's ``find_params(mse=True)``: the
clipping ratio minimising Σ|Q(w) − w|^2.4 per group; IST-DASLab/gptq ``quant.py``).
"""

from __future__ import annotations

import dataclasses

from jaxtyping import Array, Float

from methods.base import LayerResult, LayerStats, check_bits, check_group
from numerics.config import QuantConfig, rtn
from numerics.quantize import quantize


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTNConfig:
    bits: int = 4  # weight bits
    group_size: int | None = 128  # None: one scale per output channel
    sym: bool = False  # False: unsigned codes + zero point (the GPTQ/AWQ papers' RTN)
    mse_clip: bool = False  # grid-search the clipping ratio per group
    scale_dtype: str = "float16"  # scales are stored as fp16, as the papers count them
    ragged: bool = False  # allow a shorter last group when group_size does not divide in-features

    def __post_init__(self):
        check_bits(self.bits, (2, 3, 4, 6, 8) if self.sym else (1, 2, 3, 4, 6, 8), "RTN")
        check_group(self.group_size, "RTN")

    def quant_config(self) -> QuantConfig:
        return rtn(
            self.bits,
            group_size=self.group_size,
            sym=self.sym,
            scale_dtype=self.scale_dtype,
            range="mse" if self.mse_clip else "minmax",
            ragged=self.ragged,
        )


def quantize_layer(
    W: Float[Array, "out in"], stats: LayerStats, cfg: RTNConfig, *, key=None
) -> LayerResult:
    del stats, key  # data-free
    return LayerResult(quantize(W, cfg.quant_config()))
