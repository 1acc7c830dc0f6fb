"""Hypothesis strategies shared by the numerics property tests."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from numerics.config import QuantConfig

# (format, zero_point, range) combinations every generic property must hold for.
SYMMETRIC_FORMATS = [
    "int2", "int3", "int4", "int8", "nf2", "nf3", "nf4", "fp4_e2m1", "fp6_e2m3", "fp6_e3m2",
    "fp8_e4m3", "fp8_e5m2", "ternary", "binary", "bipolar2", "bipolar3",
]  # fmt: skip
ASYM_FORMATS = ["uint1", "uint2", "uint3", "uint4", "uint8"]


@st.composite
def shapes_and_configs(draw, formats=SYMMETRIC_FORMATS + ASYM_FORMATS, pow2=True):
    """A 2-D shape and a config whose granularity divides it."""
    fmt = draw(st.sampled_from(formats))
    zp = fmt.startswith("uint")
    gran = draw(st.sampled_from(["tensor", "channel", "group", "block"]))
    # few distinct shapes, so jit caches are reused across examples
    g = draw(st.sampled_from([4, 8]))
    rows = draw(st.sampled_from([1, 3])) * (g if gran == "block" else 1)
    cols = draw(st.sampled_from([1, 2])) * g
    axis = draw(st.sampled_from([-1, 0])) if gran == "channel" else -1
    # shared-exponent scales need 2^emax on the grid: bipolar-INT (odd integers) has none
    pow2_ok = pow2 and not zp and not fmt.startswith("bipolar")
    kind = "pow2" if (pow2_ok and draw(st.booleans())) else "float"
    rng = "absmean" if fmt in ("binary", "ternary") else "minmax"
    cfg = QuantConfig(
        format=fmt,
        granularity=gran,
        axis=axis,
        group_size=g,
        block_shape=(g, g),
        zero_point=zp,
        scale_kind=kind,
        range=rng,
    )
    return (rows, cols), cfg


def arrays(shape, *, scale_range=(-3, 3)):
    """Finite float32 arrays with values spread over several orders of magnitude."""
    lo, hi = scale_range
    return hnp.arrays(
        np.float32,
        shape,
        elements=st.floats(
            -(10.0**hi), 10.0**hi, allow_nan=False, allow_infinity=False, width=32
        ).filter(lambda v: v == 0 or abs(v) >= 10.0**lo),
    )
