"""The one interface every weight-quantization method implements, and its registry.

A method is two functions (the qwix ``gptq_core.py`` / ``gptq.py`` split):

* ``quantize_layer(W, stats, cfg, *, key) -> LayerResult`` — the pure core, written in the
  paper's symbols: one weight ``W[out, in]`` and the statistics of its calibration inputs
  (``LayerStats``) in, a quantized weight leaf (``QArray`` or ``DenseSparse``) out. This is
  what the shared method battery (``tests/test_methods_battery.py``) exercises.
* ``quantize_model(params, model_cfg, calib_tokens, cfg, *, ...) -> QuantizedModel`` — the thin
  walk over the harness's blocks (``methods.walk.quantize_sequential`` for most methods).

``Method`` records both with the config class, the paper, and which statistics the core needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float

STAT_NAMES = ("H", "X", "act_absmean", "act_absmax", "fisher")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerStats:
    """Calibration statistics of one linear layer's inputs (all optional; ``Method.needs`` says
    which the core reads)."""

    H: Float[Array, "d_in d_in"] | None = None  # 2/n Σ x xᵀ (GPTQ's Hessian of ‖WX − ŴX‖²)
    X: Float[Array, "n d_in"] | None = None  # a subsample of input rows (output-error objectives)
    act_absmean: Float[Array, " d_in"] | None = None  # per-channel mean |x| (AWQ)
    act_absmax: Float[Array, " d_in"] | None = None  # per-channel max |x| (SmoothQuant)
    fisher: Float[Array, "d_out d_in"] | None = (
        None  # mean squared gradient of the loss (SqueezeLLM)
    )


@dataclasses.dataclass(frozen=True)
class LayerResult:
    weight: Any  # QArray | DenseSparse — replaces the float weight leaf
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # losses, outlier counts …


@dataclasses.dataclass
class QuantizedModel:
    params: Any  # the model's params with quantized leaves
    report: list[dict[str, Any]]  # one row per linear: name, bits, seconds, errors …
    seconds: float  # wall time of the whole quantization
    bits_per_weight: float  # over all quantized linears (numerics.sparse.weight_bits)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    config: type  # the flat frozen config dataclass, defaults = the paper's
    quantize_layer: Callable[..., LayerResult]
    quantize_model: Callable[..., QuantizedModel]
    paper: str  # arXiv id
    needs: tuple[str, ...] = ()  # which LayerStats fields the core reads
    beats_rtn: bool = True  # paper claims ‖WX − ŴX‖ ≤ RTN's at the same format


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    unknown = set(method.needs) - set(STAT_NAMES)
    if unknown:
        raise ValueError(f"{method.name}: unknown statistics {sorted(unknown)}; known {STAT_NAMES}")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    import methods  # noqa: F401  (importing the package registers every method)

    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(REGISTRY)}") from None


def check_bits(bits: int, allowed: tuple[int, ...], who: str) -> None:
    if bits not in allowed:
        raise ValueError(f"{who}: bits={bits!r} not supported; choose one of {allowed}")


def check_group(group_size: int | None, who: str) -> None:
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"{who}: group_size must be a positive int or None, got {group_size!r}")


def check_groups(d_in: int, group_size: int | None, *, ragged: bool, who: str) -> None:
    """A group size must divide the in-features unless ``ragged`` (a shorter last group)."""
    if group_size is not None and d_in % group_size and not ragged:
        raise ValueError(
            f"{who}: group_size {group_size} does not divide in-features {d_in}; "
            "pass ragged=True for a shorter last group"
        )


def group_view(
    W: Float[Array, "out in"], group_size: int | None, *, ragged: bool, who: str, pad: str = "zero"
) -> Float[Array, "out ng g"]:
    """``W`` as ``[out, n_groups, g]`` float32 groups of consecutive input channels.

    With ``ragged`` a group size that leaves a remainder gives a shorter last group, padded to
    ``g`` with zeros (``pad="zero"``: exact for min-max ranges that include 0 and for errors
    weighted by zero-padded inputs) or with copies of the last column (``pad="edge"``: exact for
    min and max). :func:`ungroup` cuts the padding off again."""
    if pad not in ("zero", "edge"):
        raise ValueError(f"{who}: pad must be 'zero' or 'edge', got {pad!r}")
    out, d_in = W.shape
    check_groups(d_in, group_size, ragged=ragged, who=who)
    g = d_in if group_size is None else group_size
    W = W.astype(jnp.float32)
    extra = -d_in % g
    if extra:
        W = jnp.pad(W, ((0, 0), (0, extra)), mode="constant" if pad == "zero" else "edge")
    return W.reshape(out, -1, g)


def ungroup(Wb: Float[Array, "out ng g"], d_in: int) -> Float[Array, "out in"]:
    """The inverse of :func:`group_view`."""
    return Wb.reshape(Wb.shape[0], -1)[:, :d_in]
