"""The block structure of each model family (the adapter table), and the folds it allows.

:data:`ADAPTERS` holds one table per family; everything that needs to know how a decoder block's
linears hang together reads it, and nothing restates it:

* **groups** (:class:`LinearGroup`) — the linears that read one input, in the order the block
  computes them. That order is also GPTQ's "true sequential" order (arXiv:2210.17323, App.;
  IST-DASLab/gptq ``llama.py``: q/k/v, then o, then gate/up, then down);
* each group's **input**: its width (``d_in``) and what produces it — a norm (``norm``) or a
  preceding linear (``prev``), with what lies between the two (``via``: the attention's per-head
  mixing of tokens, or the GLU's elementwise product);
* what a **scale search** measures for the group (``inspect``: llm-awq's ``module2inspect``),
  which members skip the **clip search** (``no_clip``), and which **capture cache** of
  :class:`harness.capture.BlockCalibration` becomes valid once the group is final
  (``then_cache``).

The folds move a per-channel scale or an orthogonal map from a group's input side into the
weights that produce that input, leaving the float block's outputs unchanged:

* :func:`fold_scale` — ``W ← W·diag(s)``, and the producer ``/ s`` (AWQ arXiv:2306.00978 §3.2,
  SmoothQuant arXiv:2211.10438 eq. 3); :func:`can_fold` says whether the producer can take it.
* :func:`absorb_norm` — the RMSNorm weight multiplied into the group's columns, the norm set to
  ones: an RMSNorm without weight commutes with any orthogonal ``Q`` (``‖xQ‖ = ‖x‖``), the
  computational invariance rotation schemes rely on (SliceGPT arXiv:2401.15024 §3.1, QuaRot
  arXiv:2404.00456 §4).
* :func:`fold_rotation` — ``W ← W·Q``, and ``W_prev ← Qᵀ·W_prev`` where the map commutes with
  what lies between (QuaRot's per-head rotation of v_proj → o_proj); norm-fed groups get the
  columns only and then need their input rotated, ``x ↦ x·Q`` (an online rotation).

Also here: the params tree's dotted names (:func:`get_param` / :func:`set_param`), which the
folds and :mod:`harness.model` share. Gemma 3 has the LLaMA grouping: its post-norms act on
linear *outputs* and its q/k norms sit after q_proj / k_proj, so none precedes a linear's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from harness.layers import is_quantized

if TYPE_CHECKING:
    from harness.model import ModelConfig

CACHES = ("attention", "down_input")  # BlockCalibration.cache_attention / .cache_down_input
_WIDTHS = {  # what LinearGroup.d_in names, in ModelConfig's fields
    "d_model": lambda c: c.d_model,
    "heads": lambda c: c.n_heads * c.head_dim,
    "d_ff": lambda c: c.d_ff,
}
_VIAS = ("heads", "product")
ORTHOGONAL_ATOL = 1e-4  # max |QᵀQ − I| accepted: float32 QR / normalised Hadamard Q are ~1e-6 off


@dataclass(frozen=True, kw_only=True)
class LinearGroup:
    """Linears of one block that read the same input (block-relative names)."""

    names: tuple[str, ...]  # e.g. ("attn.q_proj", "attn.k_proj", "attn.v_proj")
    d_in: str  # input width: "d_model" | "heads" (n_heads·head_dim) | "d_ff"
    norm: str | None = None  # the norm whose output is the input (scales fold into it)
    prev: str | None = None  # the linear whose output (after ``via``) is the input
    via: str | None = None  # with prev: "heads" (attention mixes tokens per head) | "product"
    inspect: str | None = None  # module a scale search runs ("attn" | "mlp"); None: the linear
    no_clip: tuple[str, ...] = ()  # members the clip search skips (llm-awq: q/k, "qk bmm")
    then_cache: str | None = None  # capture cache valid once this group is final (CACHES)

    def __post_init__(self):
        if not self.names:
            raise ValueError("LinearGroup needs at least one linear")
        if self.d_in not in _WIDTHS:
            raise ValueError(f"LinearGroup.d_in must be one of {tuple(_WIDTHS)}, got {self.d_in!r}")
        if (self.norm is None) == (self.prev is None):
            raise ValueError(f"{self.names}: exactly one of norm / prev produces the input")
        if (self.prev is None) != (self.via is None) or self.via not in (None, *_VIAS):
            raise ValueError(f"{self.names}: via must be one of {_VIAS} with prev, None without")
        if self.inspect is not None and any(
            not n.startswith(self.inspect + ".") for n in self.names
        ):
            raise ValueError(f"{self.names}: inspect={self.inspect!r} does not hold them all")
        if set(self.no_clip) - set(self.names):
            raise ValueError(f"{self.names}: no_clip {self.no_clip} names other linears")
        if self.then_cache not in (None, *CACHES):
            raise ValueError(f"then_cache must be one of {CACHES} or None, got {self.then_cache!r}")

    def width(self, cfg: ModelConfig) -> int:
        """The members' input width under ``cfg``."""
        return _WIDTHS[self.d_in](cfg)

    def clips(self, name: str) -> bool:
        """Whether the clip search applies to member ``name``."""
        return name not in self.no_clip


_LLAMA_GROUPS = (
    LinearGroup(
        names=("attn.q_proj", "attn.k_proj", "attn.v_proj"),
        d_in="d_model",
        norm="attn_norm",
        inspect="attn",
        no_clip=("attn.q_proj", "attn.k_proj"),
        then_cache="attention",
    ),
    LinearGroup(names=("attn.o_proj",), d_in="heads", prev="attn.v_proj", via="heads"),
    LinearGroup(
        names=("mlp.gate_proj", "mlp.up_proj"),
        d_in="d_model",
        norm="mlp_norm",
        inspect="mlp",
        then_cache="down_input",
    ),
    LinearGroup(names=("mlp.down_proj",), d_in="d_ff", prev="mlp.up_proj", via="product"),
)


def _check_table(family: str, table: tuple[LinearGroup, ...]) -> None:
    """Import-time consistency: each linear once, producers earlier, each cache at most once."""
    seen: list[str] = []
    for g in table:
        if set(g.names) & set(seen) or len(set(g.names)) != len(g.names):
            raise ValueError(f"{family}: {g.names} repeats a linear")
        if g.prev is not None and g.prev not in seen:
            raise ValueError(f"{family}: {g.names} read {g.prev}, which is not computed earlier")
        seen.extend(g.names)
    caches = [g.then_cache for g in table if g.then_cache is not None]
    if len(set(caches)) != len(caches) or (table[-1].then_cache is not None):
        raise ValueError(f"{family}: a cache is declared twice or after the last group")
    if caches != [c for c in CACHES if c in caches]:
        raise ValueError(f"{family}: caches must become valid in the order {CACHES}")


ADAPTERS: dict[str, tuple[LinearGroup, ...]] = {"llama": _LLAMA_GROUPS, "gemma3": _LLAMA_GROUPS}
# The decoder (harness.model) has these seven linears in every family; a table may group them.
BLOCK_LINEARS: tuple[str, ...] = tuple(n for g in _LLAMA_GROUPS for n in g.names)
for _family, _table in ADAPTERS.items():
    _check_table(_family, _table)
    if sorted(n for g in _table for n in g.names) != sorted(BLOCK_LINEARS):
        raise ValueError(f"{_family}: the table must hold each of {BLOCK_LINEARS} once")


def groups(family: str) -> tuple[LinearGroup, ...]:
    """The adapter table of ``family``, in the block's (true-sequential) order."""
    try:
        return ADAPTERS[family]
    except KeyError:
        raise ValueError(
            f"no adapter table for family {family!r}; known {tuple(ADAPTERS)}"
        ) from None


def block_linears(family: str) -> tuple[str, ...]:
    """Block-relative names of every linear of a ``family`` block, in the table's order."""
    return tuple(n for g in groups(family) for n in g.names)


def linear_names(cfg: ModelConfig) -> list[str]:
    """Full names of every block linear, in forward order (``lm_head`` excluded)."""
    return [f"blocks.{i}.{n}" for i in range(cfg.n_layers) for n in block_linears(cfg.family)]


# Capture sites besides the linear inputs (``Model.apply_block(capture=True)``, harness.stats):
KV_SITES: tuple[str, ...] = ("attn.k_pre_rope", "attn.k", "attn.v")  # [b, t, kv·hd]
OUTPUT_SITE = "block.output"  # the block's output hidden states [b, t, d]


def input_dims(cfg: ModelConfig) -> dict[str, int]:
    """Input width of each block linear (block-relative names)."""
    return {n: g.width(cfg) for g in groups(cfg.family) for n in g.names}


def capture_dims(cfg: ModelConfig) -> dict[str, int]:
    """Width of what each capture name records: the linears' inputs (:func:`input_dims`), the
    keys / values (``KV_SITES``: ``n_kv_heads · head_dim``) and the block output (``d_model``)."""
    dims = input_dims(cfg) | {site: cfg.n_kv_heads * cfg.head_dim for site in KV_SITES}
    return dims | {OUTPUT_SITE: cfg.d_model}


def cache_input(family: str, cache: str) -> str:
    """The linear whose input ``cache`` holds: the first of the group after the one that makes
    it valid (``"attention"``: o_proj's input; ``"down_input"``: down_proj's)."""
    table = groups(family)
    for g, nxt in zip(table, table[1:], strict=False):
        if g.then_cache == cache:
            return nxt.names[0]
    raise ValueError(f"{family}: no group makes cache {cache!r} valid; caches are {CACHES}")


def not_recomputed(family: str, cache: str) -> tuple[str, ...]:
    """Linears whose inputs are not recomputed while ``cache`` is set: the members of the
    groups that make it or an earlier cache valid (the caches build on each other: down_proj's
    input is computed from the cached attention output)."""
    if cache not in CACHES:
        raise ValueError(f"unknown cache {cache!r}; expected one of {CACHES}")
    upto = CACHES[: CACHES.index(cache) + 1]
    return tuple(n for g in groups(family) if g.then_cache in upto for n in g.names)


# --------------------------------------------------------------------------------------------
# Dotted names of the params tree.


def _path(name: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def get_param(tree: Any, name: str) -> Any:
    """Leaf at a dotted name, e.g. ``blocks.3.attn.q_proj`` (or ``attn.q_proj`` in a block)."""
    node = tree
    for p in _path(name):
        try:
            node = node[p]
        except (KeyError, IndexError, TypeError) as e:
            raise KeyError(f"no parameter {name!r} (failed at {p!r})") from e
    return node


def maybe_param(tree: Any, name: str) -> Any:
    """The leaf at ``name``, or None when there is none."""
    try:
        return get_param(tree, name)
    except KeyError:
        return None


def set_param(tree: Any, name: str, value: Any) -> Any:
    """A copy of ``tree`` with the leaf at ``name`` replaced (containers copied along the path)."""
    path = _path(name)

    def rec(node, i):
        if i == len(path):
            return value
        p = path[i]
        if isinstance(node, list):
            new = list(node)
        elif isinstance(node, dict):
            if p not in node:
                raise KeyError(f"no parameter {name!r} (failed at {p!r})")
            new = dict(node)
        else:
            raise KeyError(f"no parameter {name!r} (failed at {p!r})")
        new[p] = rec(node[p], i + 1)
        return new

    return rec(tree, 0)


# --------------------------------------------------------------------------------------------
# Folds.


def _float(bp: Any, name: str, who: str) -> Any:
    w = get_param(bp, name)
    if is_quantized(w):
        raise TypeError(f"{who}: {name} is already quantized; fold into float weights first")
    return w


def _columns(bp: Any, group: LinearGroup, who: str) -> int:
    widths = {_float(bp, n, who).shape[1] for n in group.names}
    if len(widths) != 1:
        raise ValueError(f"{who}: {group.names} have different input widths {sorted(widths)}")
    return widths.pop()


def _fold_refusal(bp: Any, group: LinearGroup) -> str | None:
    """Why a per-channel scale cannot be folded into the group's producer (None: it can)."""
    if group.norm is not None:
        return None
    d_in = get_param(bp, group.names[0]).shape[1]
    rows = get_param(bp, group.prev).shape[0]
    if rows != d_in:
        return (
            f"cannot fold {d_in} scales into the {rows} rows of {group.prev}: {group.names} "
            f"read {d_in} channels made from {rows} (grouped-query attention shares each "
            "key/value head among several query heads)"
        )
    return None


def can_fold(bp: Any, group: LinearGroup) -> bool:
    """Whether :func:`fold_scale` can fold a scale for ``group`` in block params ``bp`` (not
    for a grouped-query o_proj: v_proj has fewer rows than o_proj has inputs)."""
    return _fold_refusal(bp, group) is None


def fold_scale(bp: Any, group: LinearGroup, s: Any) -> Any:
    """Fold the per-input-channel scale ``s`` into block params ``bp``: the group's columns
    ``×= s``, the preceding norm ``/= s`` or the preceding linear's rows (and bias) ``/= s``.
    The float block's outputs are unchanged up to rounding (``diag(s)`` commutes with the
    attention's mixing and with the GLU's elementwise product). Raises ValueError where the
    producer cannot take it (:func:`can_fold`), TypeError for quantized weights."""
    who = "fold_scale"
    s = jnp.asarray(s, jnp.float32)
    d_in = _columns(bp, group, who)
    if s.shape != (d_in,):
        raise ValueError(f"{who}: {group.names} need {d_in} scales, got shape {s.shape}")
    reason = _fold_refusal(bp, group)
    if reason is not None:
        raise ValueError(f"{who}: {reason}")
    for n in group.names:
        W = get_param(bp, n)
        bp = set_param(bp, n, (W * s[None, :]).astype(W.dtype))
    if group.norm is not None:
        w = get_param(bp, group.norm)
        return set_param(bp, group.norm, (w / s).astype(w.dtype))
    P = _float(bp, group.prev, who)
    bp = set_param(bp, group.prev, (P / s[:, None]).astype(P.dtype))
    b = maybe_param(bp, group.prev + "_bias")
    return bp if b is None else set_param(bp, group.prev + "_bias", (b / s).astype(b.dtype))


def absorb_norm(bp: Any, group: LinearGroup) -> Any:
    """Multiply the group's preceding RMSNorm weight into its columns and set the norm to ones
    (outputs unchanged). A weightless RMSNorm commutes with an orthogonal ``Q``, so this comes
    first when a rotation is moved upstream of the norm (QuaRot arXiv:2404.00456 §4)."""
    who = "absorb_norm"
    if group.norm is None:
        raise ValueError(f"{who}: {group.names} read {group.prev}'s output, not a norm's")
    _columns(bp, group, who)
    w = jnp.asarray(get_param(bp, group.norm), jnp.float32)
    for n in group.names:
        W = get_param(bp, n)
        bp = set_param(bp, n, (W * w[None, :]).astype(W.dtype))
    return set_param(bp, group.norm, jnp.ones_like(get_param(bp, group.norm)))


def _matmul(a: Any, b: Any, dtype: Any) -> Any:
    out = jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), precision="highest")
    return out.astype(dtype)


def _head_blocks(Q: np.ndarray, head_dim: int | None, rows: int, who: str) -> np.ndarray:
    """The per-head blocks ``[n_heads, hd, hd]`` of a block-diagonal ``Q``, refusing any other;
    with grouped-query attention (``rows`` < width) the heads of one key/value head must share
    their block. Returns the blocks of the key/value heads."""
    d = Q.shape[0]
    if head_dim is None:
        raise ValueError(f"{who}: pass head_dim: the attention mixes tokens within each head")
    if d % head_dim or rows % head_dim or d % rows:
        raise ValueError(f"{who}: widths {d} / {rows} are not whole heads of {head_dim}")
    H, hd = d // head_dim, head_dim
    on_block = np.kron(np.eye(H, dtype=bool), np.ones((hd, hd), dtype=bool))
    off = float(np.max(np.abs(Q[~on_block]), initial=0.0))
    if off != 0:
        raise ValueError(
            f"{who}: Q is not block diagonal per head of {hd} (max off-block |q| = {off:.3g}); "
            "the attention's softmax weights differ per head, so only a per-head map commutes "
            "with it"
        )
    blocks = Q.reshape(H, hd, H, hd)[np.arange(H), :, np.arange(H), :]  # [H, hd, hd]
    rep = d // rows  # query heads per key/value head (they read kv head j // rep)
    kv = blocks.reshape(H // rep, rep, hd, hd)
    if np.any(kv != kv[:, :1]):
        raise ValueError(
            f"{who}: {rep} query heads share each key/value head, so their blocks of Q must be "
            "equal to fold one rotation into v_proj's rows"
        )
    return kv[:, 0]


def fold_rotation(bp: Any, group: LinearGroup, Q: Any, *, head_dim: int | None = None) -> Any:
    """Fold an orthogonal ``Q [d_in, d_in]`` into block params ``bp``: the group's columns
    ``W ← W·Q`` and, for a group fed by a linear, that linear's rows ``W_prev ← Qᵀ·W_prev``
    (bias ``b ← b·Q``), so ``(x W_prevᵀ Q) (W Q)ᵀ = x W_prevᵀ Wᵀ``. This holds only where ``Q``
    commutes with what lies between:

    * v_proj → o_proj (``via="heads"``): ``Q`` must be block diagonal per head (``head_dim``
      required); with grouped-query attention the query heads of one key/value head must share
      one block, which is then folded into v_proj's rows once per key/value head (QuaRot's and
      SpinQuant's per-head rotation, arXiv:2404.00456 §4 / arXiv:2405.16406 R₂);
    * up_proj → down_proj (``via="product"``): the GLU's ``act(gate)·up`` commutes only with a
      diagonal ``Q`` (signs), so any other is refused — rotate down_proj's input online.

    For a norm-fed group (q/k/v, gate/up) only the columns change: the outputs stay equal only
    once the group's input is rotated too, ``x ↦ x·Q`` — an online rotation (a hook at the
    seam; not part of this function), or a rotated residual stream after :func:`absorb_norm`.

    Checks run on the concrete ``Q`` (not under ``jit``): square of the group's input width,
    orthogonal within :data:`ORTHOGONAL_ATOL`. Raises ValueError with the reason otherwise."""
    who = "fold_rotation"
    d_in = _columns(bp, group, who)
    Qn = np.asarray(Q, np.float64)
    if Qn.shape != (d_in, d_in):
        raise ValueError(f"{who}: {group.names} need Q of shape {(d_in, d_in)}, got {Qn.shape}")
    dev = float(np.max(np.abs(Qn.T @ Qn - np.eye(d_in))))
    if not dev <= ORTHOGONAL_ATOL:
        raise ValueError(f"{who}: Q is not orthogonal (max |QᵀQ − I| = {dev:.3g})")
    Qp = None
    if group.prev is not None:
        rows = _float(bp, group.prev, who).shape[0]
        if group.via == "product":
            off = float(np.max(np.abs(Qn - np.diag(np.diag(Qn)))))
            if off != 0 or rows != d_in:
                raise ValueError(
                    f"{who}: {group.prev} → {group.names} pass through the GLU's elementwise "
                    f"product act(gate)·up, which commutes only with a diagonal Q (max "
                    f"off-diagonal |q| = {off:.3g}); rotate {group.names[0]}'s input online"
                )
            Qp = Qn
        else:
            kv = _head_blocks(Qn, head_dim, rows, who)
            Qp = np.zeros((rows, rows))
            for k, blk in enumerate(kv):
                hd = blk.shape[0]
                Qp[k * hd : (k + 1) * hd, k * hd : (k + 1) * hd] = blk
    Qj = jnp.asarray(Qn, jnp.float32)
    for n in group.names:
        W = get_param(bp, n)
        bp = set_param(bp, n, _matmul(W, Qj, W.dtype))
    if Qp is None:
        return bp
    Qpj = jnp.asarray(Qp, jnp.float32)
    P = get_param(bp, group.prev)
    bp = set_param(bp, group.prev, _matmul(Qpj.T, P, P.dtype))
    b = maybe_param(bp, group.prev + "_bias")
    return bp if b is None else set_param(bp, group.prev + "_bias", _matmul(b, Qpj, b.dtype))


__all__ = [
    "ADAPTERS",
    "BLOCK_LINEARS",
    "CACHES",
    "ORTHOGONAL_ATOL",
    "LinearGroup",
    "absorb_norm",
    "block_linears",
    "cache_input",
    "can_fold",
    "fold_rotation",
    "fold_scale",
    "get_param",
    "groups",
    "input_dims",
    "linear_names",
    "maybe_param",
    "not_recomputed",
    "set_param",
]
