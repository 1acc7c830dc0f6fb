"""The method contract: what every quantization method provides and what it returns.

A **method** (:class:`Method`, one per paper, registered in :data:`REGISTRY`) is a record of

* ``kind`` — one of :data:`KINDS`; the shared battery (``tests/test_methods_battery.py``) has a
  section per kind;
* ``config`` — its flat frozen config class, defaults = the paper's;
* ``quantize_model(params, model_cfg, calib_tokens, cfg, **kw) -> QuantizedModel`` — the
  whole-model entry point (most methods walk the blocks with ``methods.walk``);
* ``quantize_layer(W, stats, cfg, *, key) -> LayerResult`` — the pure per-linear core in the
  paper's symbols (the qwix ``gptq_core.py`` / ``gptq.py`` split), where the method has one:
  one weight ``W[out, in]`` and the calibration statistics of its inputs (:class:`LayerStats`)
  in, a weight leaf (``numerics`` ``QArray``, ``DenseSparse``, …) and optionally the
  activation quantizer of that linear's input out;
* ``needs`` — the calibration statistics it reads, by their names in the open registry
  ``harness.stats`` (a new statistic is one entry there).

The **method result** (:class:`QuantizedModel`) carries everything the model needs to run
quantized: ``params`` (weight leaves replaced by quantized ones), ``hooks`` (the activation,
KV-cache and matmul numerics, ``harness.layers.Hooks``), and the report (one row per linear,
seconds, bits per weight and per activation). ``Model(model_cfg, result.hooks)`` applied to
``result.params`` is the quantized model; ``methods.compare`` evaluates exactly that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float

from harness import stats as statistics
from harness.layers import NO_HOOKS, Hooks

# Method kinds: what a result changes. Later families add theirs here and a battery section.
KINDS: dict[str, str] = {
    "weight_only": "every block linear becomes a quantized weight leaf; activations stay float",
    "weight_act": "quantized weight leaves and activation quantization (Hooks.act_quant)",
    "kv_cache": "weights as they are; keys / values quantized (Hooks.kv_quant)",
    "codebook": "codebook / vector-quantized weight leaves (VQ, AQLM, …)",
    "finetune": "a quantized base model with trained adapters",
    "trained": "a low-bit model trained from scratch",
}


class LayerStats(Mapping):
    """Calibration statistics of one linear's inputs, by their ``harness.stats`` names.

    ``LayerStats(H=H, act_absmax=m)``; read ``stats.H`` (``None`` when not given) or
    ``stats["H"]``. Only registered names are accepted, so a typo fails loudly; ``Method.needs``
    says which a core reads."""

    __slots__ = ("_values",)

    def __init__(self, **values: Any) -> None:
        for name in values:
            statistics.get(name)  # unknown names raise, listing the registered ones
        object.__setattr__(self, "_values", {k: v for k, v in values.items() if v is not None})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in statistics.STATISTICS:
            return self._values.get(name)
        raise AttributeError(
            f"LayerStats has no statistic {name!r}; registered: {sorted(statistics.STATISTICS)}"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("LayerStats is immutable")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        shapes = {k: getattr(v, "shape", v) for k, v in self._values.items()}
        return f"LayerStats({shapes})"


@dataclasses.dataclass(frozen=True)
class LayerResult:
    weight: Any  # the new weight leaf: a numerics weight leaf (QArray, DenseSparse, …) or floats
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # losses, outlier counts …
    act: Callable[[Array], Array] | None = None  # quantizer of this linear's input, at run time


@dataclasses.dataclass
class QuantizedModel:
    """A method's result: run it as ``Model(model_cfg, hooks)`` on ``params``."""

    params: Any  # the model's params with quantized leaves
    report: list[dict[str, Any]]  # one row per linear: name, bits, seconds, errors …
    seconds: float  # wall time of the whole quantization
    bits_per_weight: float  # over all quantized linears (numerics.sparse.weight_bits)
    hooks: Hooks = NO_HOOKS  # activation / KV-cache / matmul numerics of the quantized model
    bits_per_activation: float = 16.0  # bits of the linears' input activations (16: float)
    kv_bits: float = 16.0  # bits per cached key / value element (16: float)


REPORT_TOKENS = 2048  # the context at which a KV-cache result states its bits per element


def kv_cache_result(
    params: Any, model_cfg: Any, kvq: Any, *, seconds: float = 0.0, report: list | None = None
) -> QuantizedModel:
    """The result of a ``kv_cache`` method: the weights as they are, ``kvq``
    (``harness.kvcache.KVQuant``) as the hook, and its bits per cache element at
    :data:`REPORT_TOKENS` tokens (codes, scales, outliers, the full-precision window)."""
    from harness import kvcache

    kvq = kvcache.check_kv_quant(kvq)
    n = min(REPORT_TOKENS, model_cfg.max_seq_len)
    return QuantizedModel(
        params=params,
        report=list(report or []),
        seconds=seconds,
        bits_per_weight=16.0,
        hooks=Hooks(kv_quant=kvq),
        kv_bits=kvq.bits_per_element(n, model_cfg.head_dim),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    name: str
    config: type  # the flat frozen config dataclass, defaults = the paper's
    quantize_model: Callable[..., QuantizedModel]
    paper: str  # arXiv id
    kind: str = "weight_only"  # one of KINDS
    quantize_layer: Callable[..., LayerResult] | None = None  # the per-linear core, if any
    needs: tuple[str, ...] = ()  # harness.stats names the core reads
    beats_rtn: bool = False  # paper claims ‖WX − ŴX‖ ≤ RTN's at the same format


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    if method.kind not in KINDS:
        raise ValueError(f"{method.name}: unknown kind {method.kind!r}; known {sorted(KINDS)}")
    for n in method.needs:
        try:
            statistics.get(n)
        except ValueError as e:
            raise ValueError(f"{method.name}: {e}") from None
    if method.kind in ("weight_only", "weight_act") and method.quantize_layer is None:
        raise ValueError(f"{method.name}: a {method.kind} method needs a per-linear core")
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
