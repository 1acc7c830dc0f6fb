"""The open registry of calibration statistics: a new statistic is one :func:`register` call.

Each :class:`Statistic` says *where* it is recorded (its site), *how* it streams over the
calibration micro-batches (a :class:`harness.capture.Accumulator`), and *what value* a method
reads from the accumulated state. Sites:

* ``"linear"`` — the input ``x [..., d_in]`` of a block linear (recorded at the seam before any
  ``act_quant``; linears that share an input share one state, see ``harness.model.ADAPTERS``);
* ``"attn.k_pre_rope"``, ``"attn.k"``, ``"attn.v"`` — the attention keys before RoPE, after RoPE
  and the values, ``[..., n_kv_heads · head_dim]`` (KV-cache methods: KIVI, KVQuant);
* ``"block.output"`` — the block's output hidden states ``[..., d_model]`` (block-wise
  reconstruction objectives);
* ``"external"`` — computed outside the capture (SqueezeLLM's Fisher information), passed in.

``harness.capture.sequential(..., stats=...)`` records any registered statistics;
``methods.base.LayerStats`` exposes their values by name to a method's core.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from harness import capture

LINEAR = "linear"
KV_SITES = ("attn.k_pre_rope", "attn.k", "attn.v")
OUTPUT = "block.output"
EXTERNAL = "external"
SITES = (LINEAR, *KV_SITES, OUTPUT, EXTERNAL)
N_ROWS = 4096  # rows kept by the row-sample statistics


@dataclasses.dataclass(frozen=True, kw_only=True)
class Statistic:
    name: str  # the name a method asks for (``Method.needs``) and reads (``LayerStats.<name>``)
    site: str  # one of SITES
    make: Callable[[], capture.Accumulator] | None  # None for "external"
    value: Callable[[Any], Any]  # accumulated state -> what the method reads
    doc: str  # one line: what it is, which paper uses it

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"statistic {self.name!r}: site {self.site!r} not one of {SITES}")
        if (self.make is None) != (self.site == EXTERNAL):
            raise ValueError(f"statistic {self.name!r}: only external statistics have no make")


STATISTICS: dict[str, Statistic] = {}


def register(stat: Statistic) -> Statistic:
    if stat.name in STATISTICS:
        raise ValueError(f"statistic {stat.name!r} is already registered")
    STATISTICS[stat.name] = stat
    return stat


def get(name: str) -> Statistic:
    try:
        return STATISTICS[name]
    except KeyError:
        raise ValueError(
            f"unknown calibration statistic {name!r}; registered: {sorted(STATISTICS)}"
        ) from None


@functools.cache
def accumulator(name: str) -> capture.Accumulator:
    """The one accumulator object of statistic ``name`` (the capture's jitted step is cached on
    accumulator identity, so every caller gets the same object)."""
    stat = get(name)
    if stat.make is None:
        raise ValueError(f"statistic {name!r} is external: it is passed in, not captured")
    return stat.make()


def plan(names: tuple[str, ...]) -> tuple[dict[str, capture.Accumulator], dict[str, dict]]:
    """Split the captured statistics among ``names`` into ``(linear accumulators, {site:
    accumulators})`` as ``harness.capture.sequential`` takes them; external ones are skipped."""
    linear: dict[str, capture.Accumulator] = {}
    sites: dict[str, dict[str, capture.Accumulator]] = {}
    for n in names:
        stat = get(n)
        if stat.site == EXTERNAL:
            continue
        target = linear if stat.site == LINEAR else sites.setdefault(stat.site, {})
        target[n] = accumulator(n)
    return linear, sites


def values(states: dict[str, Any]) -> dict[str, Any]:
    """``{name: value}`` of accumulated ``{name: state}``."""
    return {n: get(n).value(s) for n, s in states.items()}


# ------------------------------------------------------------------------------- accumulators


def row_sample(n_rows: int = N_ROWS, seed: int = 0, of: Callable | None = None):
    """A uniform random subset of at most ``n_rows`` rows of ``of(x)`` (default: the input rows
    themselves) — reservoir by random keys: every row gets a seeded random priority and the
    ``n_rows`` highest are kept. State ``{"X", "p", "n"}``; :func:`sampled` reads it."""
    f = (lambda rows: rows) if of is None else of

    def init(d: int):
        width = jax.eval_shape(f, jax.ShapeDtypeStruct((1, d), jnp.float32)).shape[1:]
        return {
            "X": jnp.zeros((n_rows, *width), jnp.float32),
            "p": jnp.full((n_rows,), -jnp.inf, jnp.float32),
            "n": jnp.zeros((), jnp.int32),
        }

    def update(state, x):
        rows = f(x.reshape(-1, x.shape[-1]).astype(jnp.float32))
        key = jax.random.fold_in(jax.random.key(seed), state["n"])
        pri = jax.random.uniform(key, (rows.shape[0],), jnp.float32)
        allp = jnp.concatenate([state["p"], pri])
        allx = jnp.concatenate([state["X"], rows], axis=0)
        top = jax.lax.top_k(allp, n_rows)[1]
        return {"X": allx[top], "p": allp[top], "n": state["n"] + rows.shape[0]}

    return capture.Accumulator(init, update)


def sampled(state: dict[str, Any]) -> Any:
    """The rows a :func:`row_sample` kept (fewer than ``n_rows`` when fewer were seen)."""
    n = min(int(state["n"]), state["X"].shape[0])
    return state["X"][:n]


def _extreme(kind: str) -> capture.Accumulator:
    """Per-channel running max (``kind="max"``) or min (``"min"``) of the rows."""
    op, red, init = (
        (jnp.maximum, jnp.max, -jnp.inf) if kind == "max" else (jnp.minimum, jnp.min, jnp.inf)
    )

    def start(d: int):
        return jnp.full((d,), init, jnp.float32)

    def update(s, x):
        rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        return op(s, red(rows, axis=0, initial=init)) if rows.shape[0] else s

    return capture.Accumulator(start, update)


def _token_absmax(rows):
    return jnp.max(jnp.abs(rows), axis=1, keepdims=True)


def _mean(state):
    return state.mean


# ------------------------------------------------------------------------------- the entries

register(Statistic(
    name="H", site=LINEAR, make=capture.hessian, value=lambda s: s.H,
    doc="2/n Σ x xᵀ of the inputs: GPTQ's Hessian of ‖WX − ŴX‖² (arXiv 2210.17323 eq. 2)",
))  # fmt: skip
register(Statistic(
    name="X", site=LINEAR, make=row_sample, value=sampled,
    doc=f"a uniform sample of ≤ {N_ROWS} input rows (output-error objectives: AWQ, OmniQuant)",
))  # fmt: skip
register(Statistic(
    name="act_absmean", site=LINEAR, make=capture.absmean, value=_mean,
    doc="per-channel mean |x| (AWQ's s_X, arXiv 2306.00978 §3.2)",
))  # fmt: skip
register(Statistic(
    name="act_absmax", site=LINEAR, make=capture.absmax, value=lambda s: s,
    doc="per-channel max |x| (SmoothQuant's max|X_j|, arXiv 2211.10438 eq. 4)",
))  # fmt: skip
register(Statistic(
    name="act_max", site=LINEAR, make=lambda: _extreme("max"), value=lambda s: s,
    doc="per-channel max x (asymmetric static activation ranges)",
))  # fmt: skip
register(Statistic(
    name="act_min", site=LINEAR, make=lambda: _extreme("min"), value=lambda s: s,
    doc="per-channel min x (asymmetric static activation ranges)",
))  # fmt: skip
register(Statistic(
    name="token_absmax", site=LINEAR, make=lambda: row_sample(of=_token_absmax),
    value=lambda s: sampled(s)[:, 0],
    doc=f"max |x| over channels of ≤ {N_ROWS} sampled tokens (per-token ranges, LLM.int8())",
))  # fmt: skip
for _site, _what in zip(KV_SITES, ("keys before RoPE", "keys after RoPE", "values"), strict=True):
    _short = _site.split(".")[1]
    register(Statistic(
        name=f"{_short}_absmax", site=_site, make=capture.absmax, value=lambda s: s,
        doc=f"per-channel max |·| of the {_what} [n_kv_heads·head_dim] (KIVI, KVQuant)",
    ))  # fmt: skip
    register(Statistic(
        name=f"{_short}_sample", site=_site, make=row_sample, value=sampled,
        doc=f"≤ {N_ROWS} sampled token rows of the {_what} (KVQuant's per-channel k-means)",
    ))  # fmt: skip
register(Statistic(
    name="output_sample", site=OUTPUT, make=row_sample, value=sampled,
    doc=f"≤ {N_ROWS} sampled rows of the block's output hidden states",
))  # fmt: skip
register(Statistic(
    name="output_absmax", site=OUTPUT, make=capture.absmax, value=lambda s: s,
    doc="per-channel max |·| of the block's output hidden states (massive activations)",
))  # fmt: skip
register(Statistic(
    name="fisher", site=EXTERNAL, make=None, value=lambda s: s,
    doc="mean squared gradient of the loss w.r.t. W (SqueezeLLM, arXiv 2306.07629 eq. 3)",
))  # fmt: skip
