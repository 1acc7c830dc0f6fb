"""A named zoo of quantizer configs and an error table over it (the repo's first main job).

``ZOO`` names one representative config per format family; ``error_table`` measures each
on the given arrays: bits per weight (with scales), SQNR in dB and relative Frobenius error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from numerics.config import QuantConfig, block_fp, block_minifloat, mx, rtn
from numerics.packing import bits_per_weight
from numerics.quantize import quant_error, quantize


def _g(fmt: str, g: int, **kw) -> QuantConfig:
    return QuantConfig(format=fmt, granularity="group", group_size=g, scale_dtype="float16", **kw)


ZOO: dict[str, QuantConfig] = {
    "INT8 per-channel": QuantConfig(format="int8", granularity="channel", scale_dtype="float16"),
    "FP8 E4M3 per-channel": QuantConfig(
        format="fp8_e4m3", granularity="channel", scale_dtype="float16"
    ),
    "FP8 E5M2 per-channel": QuantConfig(
        format="fp8_e5m2", granularity="channel", scale_dtype="float16"
    ),
    "MXINT8": mx("mxint8"),
    "MXFP8 E4M3": mx("mxfp8_e4m3"),
    "MXFP6 E3M2": mx("mxfp6_e3m2"),
    "MXFP6 E2M3": mx("mxfp6_e2m3"),
    "FP6 E2M3 g64": _g("fp6_e2m3", 64),
    "INT4 sym g128": rtn(4, group_size=128, scale_dtype="float16"),
    "INT4 asym g128": rtn(4, group_size=128, sym=False, scale_dtype="float16"),
    "INT4 asym g128 MSE-clip": rtn(
        4, group_size=128, sym=False, scale_dtype="float16", range="mse"
    ),
    "NF4 g64": _g("nf4", 64),
    "FP4 E2M1 g64": _g("fp4_e2m1", 64),
    "FP4 E3M0 g64": _g("fp4_e3m0", 64),
    "MXFP4": mx("mxfp4"),
    "BFP 4-bit mantissa / 16": block_fp(4, 16),
    "block minifloat E2M1 / 16": block_minifloat("fp4_e2m1", 16),
    "INT3 asym g128": rtn(3, group_size=128, sym=False, scale_dtype="float16"),
    "NF3 g64": _g("nf3", 64),
    "INT2 asym g64": rtn(2, group_size=64, sym=False, scale_dtype="float16"),
    "ternary absmean per-channel": QuantConfig(
        format="ternary", range="absmean", scale_dtype="float16"
    ),
    "binary absmean per-channel": QuantConfig(
        format="binary", range="absmean", scale_dtype="float16"
    ),
}


def synthetic(kind: str, shape=(1024, 4096), seed: int = 0) -> jax.Array:
    """``gaussian`` N(0,1) or ``heavy`` Student-t with ν = 3 (heavy-tailed, LLM-weight-like)."""
    key = jax.random.key(seed)
    if kind == "gaussian":
        return jax.random.normal(key, shape, jnp.float32)
    if kind == "heavy":
        return jax.random.t(key, 3.0, shape, jnp.float32)
    raise ValueError(f"unknown synthetic data kind {kind!r}")


def error_table(data: dict[str, jax.Array], zoo: dict[str, QuantConfig] = ZOO) -> list[dict]:
    """One row per config: name, format, bits/weight, and SQNR / rel. error per dataset."""
    rows = []
    for name, cfg in zoo.items():
        row = {"quantizer": name, "format": cfg.fmt.name}
        for dname, x in data.items():
            row["bpw"] = bits_per_weight(quantize(x, cfg))
            e = quant_error(x, cfg)
            row[f"{dname} SQNR dB"] = e["sqnr_db"]
            row[f"{dname} rel err"] = e["rel_err"]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
