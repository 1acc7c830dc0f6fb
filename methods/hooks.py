"""Hooks of a method result, built from per-linear quantizers (the ``Hooks`` seam of harness).

A weight-and-activation method's cores return, beside each weight leaf, the quantizer of that
linear's input (``LayerResult.act``); :func:`act_hooks` bundles them into one
``harness.layers.Hooks`` whose ``act_quant(name, x)`` looks the linear up by its full name
(``blocks.3.attn.q_proj``) and leaves every other linear (``lm_head``) alone. The table is an
identity-hashed object built once per result, so ``jax.jit`` compiles the quantized model once
and reuses it for every call with that result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from jaxtyping import Array

from harness.layers import NO_HOOKS, Hooks


@dataclasses.dataclass(frozen=True, eq=False)
class ActTable:
    """``act_quant(name, x)``: ``quantizers[name](x)``, or ``x`` for linears not in the table."""

    quantizers: Mapping[str, Callable[[Array], Array]]

    def __call__(self, name: str, x: Array) -> Array:
        q = self.quantizers.get(name)
        return x if q is None else q(x)


def act_hooks(quantizers: Mapping[str, Callable[[Array], Array]], base: Hooks = NO_HOOKS) -> Hooks:
    """``base`` with ``act_quant`` set to the table of ``quantizers`` (``base`` must have none)."""
    if base.act_quant is not None:
        raise ValueError("act_hooks: the base hooks already quantize activations")
    if not quantizers:
        return base
    return dataclasses.replace(base, act_quant=ActTable(dict(quantizers)))
