"""The harness's linear seam routed through the Pallas kernels (issue 5, "Integration").

A model whose linear weights are ``numerics.QArray`` leaves runs its products through
:func:`kernels.mpgemm.qarray_matmul` — packed codes, group scales and zero points read by the
kernel, dequantized tile by tile, never a dequantized weight in memory — by passing
``kernel_hooks(...)`` to :class:`harness.model.Model`:

    params = pack_quantized(params)                      # uint32 words along the input axis
    model = Model(cfg, kernel_hooks(interpret=False))    # compiled (GPU); True: interpreter
    logits = jax.jit(model.forward)(params, tokens)

* :class:`KernelMatmul` — the ``Hooks.matmul(name, x, w_leaf)`` callable: a ``QArray`` leaf
  (packed or not) goes to ``qarray_matmul``; a float leaf to exactly the plain seam's product
  (:func:`harness.layers.linear` without hooks), so unquantized layers (embeddings, heads left
  in float) are bit-identical to the fake-quantized model's. Other quantized objects (AWQ's
  ``ScaledQArray``, ``DenseSparse``, SqueezeLLM's ``LUTWeight``) have no kernel: they raise a
  TypeError unless ``dense_fallback=True`` lets them through the plain (dequantize-then-dot)
  seam. It is a frozen dataclass, so equal arguments give equal, equally-hashed hooks and
  ``jax.jit`` does not recompile for a rebuilt ``Hooks``.
* :func:`kernel_matmul` — the same as a plain function with keyword options.
* :func:`kernel_hooks` — a :class:`harness.layers.Hooks` with that matmul (optionally on top
  of a method's ``act_quant`` / ``kv_quant`` hooks).
* :func:`pack_quantized` — every ``QArray`` leaf of a params pytree packed along its last
  (input) axis into uint32 words, the layout the kernels read; done once ahead of time so the
  forward pass does not repack on every call.

Numerics: the kernel's dequantized tile is bit-identical to ``QArray.dequantize()`` followed by
the seam's cast to the activation dtype (see ``kernels/mpgemm.py``), so the kernel path and the
fake-quantized model differ only by the order of the float32 accumulation inside each product
(``tests/test_kernel_path.py`` measures it on whole models).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jaxtyping import Array, Float

from harness.layers import NO_HOOKS, Hooks, is_quantized, linear
from kernels.mpgemm import qarray_matmul
from numerics.qarray import QArray

TILE_NAMES = ("block_m", "block_n", "block_k", "split_k")  # mpgemm's tile keywords
_WORD_BITS = 32  # the kernels read uint32 words


def _check_tiles(tiles: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    unknown = sorted(set(tiles) - set(TILE_NAMES))
    if unknown:
        raise ValueError(f"unknown tile option(s) {unknown}; mpgemm takes {list(TILE_NAMES)}")
    for k, v in tiles.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"tile option {k} must be a positive int or None, got {v!r}")
    return tuple(sorted((k, v) for k, v in tiles.items() if v is not None))


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelMatmul:
    """``Hooks.matmul`` that sends ``QArray`` weight leaves to the Pallas mpGEMM kernel."""

    interpret: bool  # True: Pallas interpreter (CPU, tests); False: compiled Triton (GPU)
    tiles: tuple[tuple[str, int], ...] = ()  # sorted (name, value) tile overrides for mpgemm
    dense_fallback: bool = False  # quantized leaves other than QArray: plain seam, not an error

    def __call__(
        self, name: str, x: Float[Array, "*batch d_in"], w: Any
    ) -> Float[Array, "*batch d_out"]:
        if isinstance(w, QArray):
            try:
                return qarray_matmul(x, w, interpret=self.interpret, **dict(self.tiles))
            except ValueError as e:  # say which layer the kernel could not take
                raise ValueError(f"{name}: {e}") from e
        if is_quantized(w) and not self.dense_fallback:
            raise TypeError(
                f"{name}: the kernel path reads numerics QArray weights; got "
                f"{type(w).__name__}, which has no kernel (kernel_hooks(dense_fallback=True) "
                "runs such leaves through the plain dequantize-then-dot seam)"
            )
        return linear(x, w, name=name)  # the plain seam's own product, bit-identical


def kernel_matmul(
    name: str,
    x: Float[Array, "*batch d_in"],
    w_leaf: Any,
    *,
    interpret: bool = False,
    dense_fallback: bool = False,
    **tiles: int | None,
) -> Float[Array, "*batch d_out"]:
    """``x @ Ŵᵀ`` of linear ``name``: a ``QArray`` leaf (packed or not) through
    :func:`kernels.mpgemm.qarray_matmul`, a float leaf through the plain seam's product.
    ``tiles``: ``block_m``, ``block_n``, ``block_k``, ``split_k`` (see ``kernels/mpgemm.py``)."""
    mm = KernelMatmul(interpret=interpret, tiles=_check_tiles(tiles), dense_fallback=dense_fallback)
    return mm(name, x, w_leaf)


def kernel_hooks(
    *,
    interpret: bool,
    base: Hooks = NO_HOOKS,
    dense_fallback: bool = False,
    **tiles: int | None,
) -> Hooks:
    """``base`` (a method's ``act_quant`` / ``kv_quant`` hooks; none by default) with its matmul
    replaced by :class:`KernelMatmul`. Equal arguments give equal hooks (no recompilation)."""
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be a bool, got {type(interpret).__name__}")
    if not isinstance(base, Hooks):
        raise TypeError(f"base must be a harness.layers.Hooks, got {type(base).__name__}")
    if base.matmul is not None:
        raise ValueError("base already sets a matmul hook; the kernel path would replace it")
    mm = KernelMatmul(interpret=interpret, tiles=_check_tiles(tiles), dense_fallback=dense_fallback)
    return dataclasses.replace(base, matmul=mm)


def _pack_leaf(qa: QArray) -> QArray:
    if qa.ndim == 0:
        raise ValueError("pack_quantized: a 0-d QArray has no input axis to pack along")
    axis = qa.ndim - 1
    if qa.packing == (axis, _WORD_BITS):
        return qa
    return qa.unpack().pack(axis=axis, word_bits=_WORD_BITS)


def pack_quantized(params: Any) -> Any:
    """``params`` with every ``QArray`` leaf's codes packed along the last (input) axis into
    uint32 words (``numerics.packing``; ``(axis, word_bits) = (1, 32)`` for a weight
    ``[out, in]``), the layout :func:`kernels.mpgemm.mpgemm` reads. Leaves already so packed are
    kept; other packings are unpacked and repacked; float leaves are untouched. Values are
    unchanged (packing is lossless): ``dequantize()`` gives the same array."""
    return jax.tree.map(
        lambda v: _pack_leaf(v) if isinstance(v, QArray) else v,
        params,
        is_leaf=lambda v: isinstance(v, QArray),
    )
