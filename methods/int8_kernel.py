"""The int8 paths of the W+A methods through the Pallas W8A8 kernel, on the matmul seam.

A W8A8 result (``smoothquant``, ``w8a8``, ``llm_int8``) normally runs fake-quantized: its
``Hooks.act_quant`` rounds each linear's input to the int8 grid and the seam multiplies floats.
:func:`int8_kernel_hooks` turns that result's hooks into ones whose ``matmul`` does the real
thing (:class:`Int8KernelMatmul`): the activation is quantized to int8 *codes* — per-token
dynamic, per-tensor dynamic or per-tensor static, exactly the codes ``methods.actquant`` rounds
to — and ``kernels.w8a8.w8a8`` multiplies them with the weight's int8 codes, accumulating in
int32, and applies ``s_x[m] · s_w[n]`` once. LLM.int8()'s outlier columns (found at run time,
``methods.actquant.outlier_mask``) are zeroed in the int8 operand and multiplied in float
against the dequantized weight (eq. 7 of arXiv 2208.07339), then added.

    hooks = int8_kernel_hooks(result.hooks, interpret=False)   # compiled (GPU); True: CPU
    logits = jax.jit(Model(cfg, hooks).forward)(result.params, tokens)

Numerics: the int32 sum is exact, so the kernel path differs from the fake-quantized one only by
float rounding — the fake path rounds each product ``(q_x s_x)(q_w s_w)`` and sums in float32,
the kernel rounds ``float32(acc) · s_x · s_w`` three times — both within
``kernels.common.dot_error_bound(|x̂| @ |Ŵ|ᵀ, y, K, float32, products_exact=False)`` of the
exact product (``tests/test_int8_kernel.py``).

Linears the act table does not cover (``lm_head``) and float weight leaves go through the plain
seam, bit-identical to the fake path. Activations the kernel cannot take (anything but 8-bit INT)
and weights that are not symmetric int8 ``QArray`` s raise a ValueError naming the linear.
:class:`Int8KernelMatmul` is a frozen dataclass of hashable fields, so rebuilt hooks hash equal
and ``jax.jit`` does not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from harness.layers import Hooks, linear
from kernels.w8a8 import w8a8
from methods.actquant import ActQuantizer, outlier_mask
from methods.hooks import ActTable
from numerics.formats import IntFormat
from numerics.qarray import QArray
from numerics.quantize import quantize

INT8 = IntFormat(bits=8, signed=True)


def _weight_int8(name: str, w: Any) -> tuple[Array, Array]:
    """Signed int8 codes ``[N, K]`` and per-row scales ``[N]`` of a per-tensor or per-channel
    symmetric int8 weight ``QArray``."""
    if not isinstance(w, QArray):
        raise ValueError(
            f"{name}: the int8 kernel needs an int8 QArray weight, got {type(w).__name__}"
        )
    if w.format != INT8 or w.zero is not None or w.ndim != 2:
        raise ValueError(
            f"{name}: the int8 kernel needs symmetric 8-bit INT weights [out, in], got "
            f"{w.format.name}{' with zero points' if w.zero is not None else ''} of shape {w.shape}"
        )
    N, K = w.shape
    if w.block_shape not in ((1, K), (N, K)):
        raise ValueError(
            f"{name}: the int8 kernel needs per-channel or per-tensor weight scales, got blocks "
            f"{w.block_shape} for shape {w.shape}"
        )
    codes = lax.bitcast_convert_type(w.unpacked_codes(), jnp.int8)
    s = jnp.broadcast_to(w.scale_array().reshape(-1, 1), (N, 1))[:, 0]
    return codes, s.astype(jnp.float32)


def _act_int8(name: str, act: ActQuantizer, x: Float[Array, "M K"]) -> tuple[Array, Array]:
    """Int8 codes ``[M, K]`` and per-row scales ``[M]`` of ``x``: the codes ``act(x)`` rounds to."""
    cfg = act.cfg
    if cfg.format != "int" or cfg.bits != 8:
        raise ValueError(
            f"{name}: kernels.w8a8 takes 8-bit INT activations; this linear quantizes them to "
            f"{cfg.bits}-bit {cfg.format} (run it fake-quantized instead)"
        )
    M = x.shape[0]
    if cfg.static:
        s = jnp.float32(act.scale)
        codes = INT8.encode(x.astype(jnp.float32) / s)
        return lax.bitcast_convert_type(codes, jnp.int8), jnp.full((M,), s, jnp.float32)
    qa = quantize(x, cfg.quant_config())
    s = jnp.broadcast_to(qa.scale_array().reshape(-1, 1), (M, 1))[:, 0]
    return lax.bitcast_convert_type(qa.unpacked_codes(), jnp.int8), s.astype(jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8KernelMatmul:
    """``Hooks.matmul(name, x, w)``: int8 × int8 → int32 through ``kernels.w8a8`` for the linears
    in ``acts`` (their input quantizers), the plain seam for every other one."""

    interpret: bool  # True: Pallas interpreter (CPU, tests); False: compiled (GPU)
    acts: tuple[tuple[str, ActQuantizer], ...]  # sorted (linear name, its input quantizer)

    def __call__(self, name: str, x: Float[Array, "*b K"], w: Any) -> Float[Array, "*b N"]:
        act = dict(self.acts).get(name)
        if act is None:
            return linear(x, w, name=name)
        wq, s_w = _weight_int8(name, w)
        K = x.shape[-1]
        if wq.shape[1] != K:
            raise ValueError(f"{name}: weight shape {wq.shape} does not take inputs of {x.shape}")
        out = None
        if act.cfg.outlier_threshold is not None:
            mask = outlier_mask(x, act.cfg.outlier_threshold)
            zero = jnp.zeros_like(x)
            out = linear(jnp.where(mask, x, zero), w, name=name)  # float columns, eq. 7
            x = jnp.where(mask, zero, x)
        xq, s_x = _act_int8(name, act, x.reshape(-1, K))
        y = w8a8(xq, wq, s_x, s_w, interpret=self.interpret).astype(x.dtype)
        y = y.reshape(*x.shape[:-1], wq.shape[0])
        return y if out is None else (out + y).astype(x.dtype)


def int8_kernel_hooks(hooks: Hooks, *, interpret: bool) -> Hooks:
    """A W+A result's ``hooks`` with its activation quantizers moved into the int8 kernel
    matmul (:class:`Int8KernelMatmul`); ``act_quant`` is dropped (the kernel quantizes)."""
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be a bool, got {type(interpret).__name__}")
    if hooks.matmul is not None:
        raise ValueError("the hooks already set a matmul; the int8 kernel path would replace it")
    table = hooks.act_quant
    if not isinstance(table, ActTable):
        raise ValueError(
            "int8_kernel_hooks needs a W+A result's hooks (act_quant a methods.hooks.ActTable), "
            f"got act_quant={table!r}"
        )
    for n, q in table.quantizers.items():
        if not isinstance(q, ActQuantizer):
            raise ValueError(f"{n}: its activation quantizer {q!r} is not an ActQuantizer")
    acts = tuple(sorted(table.quantizers.items()))
    mm = Int8KernelMatmul(interpret=interpret, acts=acts)
    return dataclasses.replace(hooks, act_quant=None, matmul=mm)
