"""GPTQ — one-shot weight quantization with second-order error feedback.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv 2210.17323, Algorithm 1; checked against IST-DASLab/gptq
(``gptq.py: GPTQ.fasterquant``, ``quant.py: Quantizer.find_params``).

For one linear ``W[out, in]`` with calibration inputs ``X`` the layer-wise objective is
``‖WX − ŴX‖²`` whose Hessian w.r.t. a row of ``W`` is ``H = 2XXᵀ`` (eq. 1–2). Columns (input
channels) are quantized left to right; after column ``j`` is rounded to ``q`` the error is
spread over the not-yet-quantized columns through the inverse Hessian (OBS update, eq. 3,
in its Cholesky form, Step 3 of §4):

    U = chol(H⁻¹)ᵀ            (upper; H⁻¹ = UᵀU, after damping H += λI, λ = percdamp·mean diag H)
    e = (w_j − q_j) / U_jj
    W[:, k] −= e · U_jk        for k > j

Lazy batch updates (Step 2): inside a block of ``block_size`` columns the updates are applied
column by column to the block only; the rest of ``W`` receives them once per block as a matrix
product ``E · U[block, rest]``. The factor and the loop are the shared engine
``numerics.second_order`` (``inverse_hessian_factor``, ``obs_loop``; SpQR is its other
configuration); GPTQ supplies the quantizer: a ``step`` that rounds one column on its group's
grid, and a ``choose`` that fits a group's scale / zero point at its first column. All compiled
(``cfg`` static): a ``lax.scan`` over blocks, ``lax.fori_loop`` over groups and columns.

Degenerate calibration (``quantize_layer``, the checked entry; the jitted ``gptq`` is
unchecked): a non-finite ``H``, an all-zero one (every input dead — the reference would return
an all-zero weight) and one that is not PSD (``numerics.second_order.check_hessian``) raise
``ValueError``, and so does a NaN loss (``H + λI`` without a float32 Cholesky factor: raise
``percdamp``); partly dead inputs take the reference's fallback below and are counted in
``info["dead_inputs"]`` (a column of the walk's per-linear report).

Details as in the reference:

* dead inputs (``diag H = 0``): ``H_jj := 1`` and ``W[:, j] := 0`` — harmless for an input
  that is truly zero; keeping the weights instead (the column is decoupled, so it would simply
  be rounded) would change its group's range and so the reference's numbers; the real SmolLM2
  layers have no dead inputs;
* ``act_order`` ("desc_act"): columns are processed by decreasing ``diag H`` and un-permuted at
  the end (the QArray is in the original column order);
* groups: without act-order, a group's scale/zero point are chosen when its first column is
  reached, from the weights as updated by all *previous blocks* (the reference reads
  ``W[:, i:i+g]``, which lazily lacks the current block's updates — reproduced exactly);
  ``static_groups``: every group's parameters are chosen once, from ``W`` before any update;
  per-channel (``group_size=None``): from the original ``W`` (the reference's first
  ``find_params``);
* ``mse_clip``: the group parameters come from the ``numerics`` "mse" range (the reference's
  ``find_params(mse=True)``: shrink grid 100, max shrink 0.8, norm 2.4);
* ``ragged``: a group size that leaves a remainder (g128 on SmolLM2's 576 features) gives a
  shorter last group, as the reference's ``W[:, i:i+groupsize]`` slice does at the last columns.

Differences from the reference, on purpose:

* ``H⁻¹`` is symmetrised, ``(H⁻¹ + H⁻ᵀ)/2``, before its Cholesky factor (the engine's choice
  for GPTQ and SpQR alike; the reference's ``torch.linalg.cholesky`` reads one triangle).
  ``jnp.linalg.cholesky`` already symmetrised its input by default, so the codes did not
  change when the engine made the choice explicit. Against one triangle (``symmetrize=False``)
  ``U`` differs by ≤ 3.5e-6 relative and no code changes on the tests' layers or SmolLM2's
  block-0 linears (8 × 512 C4 tokens; ‖WX − ŴX‖ equal to 7 digits);
* the grid is lowbit's (``numerics.config.rtn``, the same as the RTN baseline): asymmetric
  ``uint{b}`` with integer zero point — identical to the reference's, with the scale rounded to
  float16 first so that dequantization reproduces GPTQ's ``Q`` exactly; *symmetric* is the
  signed narrow grid ``[−(2^{b−1}−1), 2^{b−1}−1]·s`` rather than the reference's
  ``uint{b}`` with fixed zero ``2^{b−1}`` (an extra negative level);
* act-order with groups needs ``static_groups=True``: lowbit's ``QArray`` stores contiguous
  groups (no per-column group index ``g_idx``), and permuted dynamic groups are not contiguous;
* ``block_size`` and ``group_size`` must nest (one divides the other), so a block starts at most
  one group or holds whole groups (the defaults 128/128 do).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, UInt8

from methods.base import LayerResult, LayerStats, check_bits, check_group, check_groups
from numerics import granularity as G
from numerics import ranges
from numerics import second_order as so
from numerics.config import QuantConfig, rtn
from numerics.qarray import QArray
from numerics.quantize import check_input


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQConfig:
    bits: int = 4  # weight bits
    group_size: int | None = 128  # columns (input channels) per scale; None: one per output row
    sym: bool = False  # False: uint codes + zero point (the reference's default)
    percdamp: float = 0.01  # λ = percdamp · mean(diag H)
    block_size: int = 128  # columns per lazy-batch block (Step 2)
    act_order: bool = False  # process columns by decreasing diag H ("desc_act")
    static_groups: bool = False  # group parameters from W before any update (needed w/ act_order)
    mse_clip: bool = False  # MSE grid search of each group's clipping range
    true_sequential: bool = True  # q/k/v → o → gate/up → down inside a block (the walk's order)
    scale_dtype: str = "float16"  # stored scales (the paper counts 16-bit scales)
    ragged: bool = False  # allow a shorter last group when group_size does not divide in-features

    def __post_init__(self):
        check_bits(self.bits, (2, 3, 4, 8) if self.sym else (1, 2, 3, 4, 8), "GPTQ")
        check_group(self.group_size, "GPTQ")
        if not (isinstance(self.percdamp, float | int) and 0.0 < self.percdamp < 1.0):
            raise ValueError(f"GPTQ: percdamp must be in (0, 1), got {self.percdamp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"GPTQ: block_size must be a positive int, got {self.block_size!r}")
        g, b = self.group_size, self.block_size
        if g is not None and g % b and b % g:
            raise ValueError(f"GPTQ: block_size {b} and group_size {g} must divide one another")
        if self.ragged and self.mse_clip:
            raise ValueError(
                "GPTQ: ragged groups need the min-max range (a zero-padded last group would "
                "change the MSE clip search); drop mse_clip or ragged"
            )
        if self.act_order and g is not None and not self.static_groups:
            raise ValueError(
                "GPTQ: act_order with group_size needs static_groups=True (QArray groups are "
                "contiguous input channels; permuted dynamic groups would need a g_idx)"
            )

    @classmethod
    def for_format(cls, bits: int, group_size: int | None, **kw) -> GPTQConfig:
        """The paper's defaults at ``W{bits} g{group_size}`` (asymmetric, as the paper's tables)."""
        return cls(bits=bits, group_size=group_size, **kw)

    def quant_config(self) -> QuantConfig:
        return rtn(
            self.bits,
            group_size=self.group_size,
            sym=self.sym,
            scale_dtype=self.scale_dtype,
            range="mse" if self.mse_clip else "minmax",
            ragged=self.ragged,
        )


# --------------------------------------------------------------------------------- the core


def _params(Wg: Float[Array, "out n"], g: int, how: QuantConfig):
    """Scale / zero point of each group of ``g`` consecutive columns: ``[out, n // g]`` each."""
    s, z = ranges.choose_params(G.to_blocks(Wg, (1, g)), how)
    return s, (jnp.zeros_like(s) if z is None else z)


def _per_column(p: Array, g: int) -> Array:
    """``[out, k]`` → ``[out, k·g]``: each group's value for each of its columns."""
    r, k = p.shape
    return jnp.broadcast_to(p[:, :, None], (r, k, g)).reshape(r, k * g)


def _round(w: Array, s: Array, z: Array, how: QuantConfig) -> tuple[Array, Array]:
    """Codes and quantized values ``q = (decode(code) − z)·s`` of one column (lowbit's grid)."""
    y = w / s
    if how.zero_point:
        y = jnp.round(y) + z
    code = how.fmt.encode(y)
    return code, (how.fmt.decode(code) - z) * s


def inverse_hessian_factor(H: Float[Array, "n n"], percdamp: float) -> Float[Array, "n n"]:
    """``U`` upper triangular with ``(H + λI)⁻¹ = UᵀU``, ``λ = percdamp·mean(diag H)`` (§4 Step 3;
    ``numerics.second_order.inverse_hessian_factor``, symmetrised ``H⁻¹``)."""
    return so.inverse_hessian_factor(H, percdamp)


@functools.partial(jax.jit, static_argnames=("cfg",))
def gptq(
    W: Float[Array, "out n"], H: Float[Array, "n n"], cfg: GPTQConfig
) -> tuple[UInt8[Array, "out n"], Array, Array, Array]:
    """Algorithm 1 of arXiv 2210.17323 (see the module docstring) — the raw compiled core:
    unchecked (an all-zero, non-finite or indefinite ``H`` gives zeros or NaNs silently; the
    checks are in :func:`quantize_layer`).

    Returns ``(codes [out, n] uint8, scale [out, n_groups] float32 (float16-exact),
    zero [out, n_groups] float32 (0 when symmetric), loss)`` where ``loss`` is the reference's
    ``Σ (w − q)² / U_jj² / 2``, GPTQ's estimate of ``‖WX − ŴX‖²`` (up to H's normalization).
    """
    how = cfg.quant_config()
    rows, n = W.shape
    g = cfg.group_size or n
    W = W.astype(jnp.float32)
    H, dead = so.fix_dead(H.astype(jnp.float32))
    W0 = W  # per-channel parameters come from W before the dead columns are zeroed
    W = jnp.where(dead[None, :], 0.0, W)

    # Fixed per-column parameters (per-channel / static groups), in the original column order.
    static = cfg.group_size is None or cfg.static_groups
    if cfg.group_size is None:
        S0, Z0 = _params(W0, n, how)
    else:
        S0, Z0 = _params(W, g, how)  # a ragged last group is zero-padded: min-max includes 0
    S0, Z0 = _per_column(S0, g)[:, :n], _per_column(Z0, g)[:, :n]

    perm = jnp.argsort(-jnp.diag(H), stable=True) if cfg.act_order else jnp.arange(n)
    W, H, S0, Z0 = W[:, perm], H[perm][:, perm], S0[:, perm], Z0[:, perm]

    # Pad to whole blocks and groups: padded columns are zero with identity Hessian rows, so
    # they are decoupled from the real ones (U is block diagonal there) and quantize to exact
    # zeros; a ragged last group's min-max range is unchanged by them (it always includes 0).
    B = min(cfg.block_size, n)
    m = n + (-n % max(B, cfg.group_size or 1))
    W, U = so.pad_decoupled(W, inverse_hessian_factor(H, cfg.percdamp), m)
    S0 = jnp.pad(S0, ((0, 0), (0, m - n)), constant_values=1.0)
    Z0 = jnp.pad(Z0, ((0, 0), (0, m - n)))

    # The quantizer state is the per-column (scale, zero), stored column-major [m, out] so that
    # a column's parameters are contiguous; dynamic groups fill it in when a group's first
    # column is reached, from the lazily updated W (the reference's ``W[:, i:i+g]``, which
    # lacks the current block's updates).
    def step(w, j, d, st):
        s = jax.lax.dynamic_index_in_dim(st[0], j, axis=0, keepdims=False)
        z = jax.lax.dynamic_index_in_dim(st[1], j, axis=0, keepdims=False)
        code, q = _round(w[:, 0], s, z, how)
        return q[:, None], code[:, None]

    c = min(g, B)  # the cadence of the choices: a group's start (g <= B) or a block's (g > B)

    def choose(Wg, Wc, j0, st):
        def fresh(_):
            s, z = _params(jax.lax.dynamic_slice_in_dim(Wc, j0, g, axis=1), g, how)
            return s[:, 0], z[:, 0]

        def keep(_):  # g > B and the group began in an earlier block
            col = lambda A: jax.lax.dynamic_index_in_dim(A, j0 - 1, axis=0, keepdims=False)
            return col(st[0]), col(st[1])

        s, z = fresh(None) if g <= B else jax.lax.cond(j0 % g == 0, fresh, keep, None)
        rep = lambda v: jnp.broadcast_to(v[None, :], (c, rows))
        put = lambda A, v: jax.lax.dynamic_update_slice_in_dim(A, rep(v), j0, axis=0)
        return put(st[0], s), put(st[1], z)

    r = so.obs_loop(
        W,
        U,
        step,
        block_size=B,
        group=None if static else c,
        choose=None if static else choose,
        state=(S0.T, Z0.T),
    )
    inv = jnp.argsort(perm)
    C, S, Z = (A[:, :n][:, inv] for A in (r.out, r.state[0].T, r.state[1].T))
    return C, S[:, ::g], Z[:, ::g], jnp.sum(r.err) / 2


def quantize_layer(
    W: Float[Array, "out in"], stats: LayerStats, cfg: GPTQConfig, *, key=None
) -> LayerResult:
    """GPTQ of one linear: ``W`` and its inputs' ``H = 2XXᵀ`` (``stats.H``) → ``QArray`` whose
    dequantization is exactly GPTQ's ``Q``. Jit-able (``cfg`` static); ``key`` unused.

    The checked entry: a non-finite ``H``, all-dead inputs (``H = 0``: an all-zero calibration)
    or an ``H`` that is not PSD raise ``ValueError`` (``numerics.second_order.check_hessian``),
    and so does a NaN loss (``H + λI`` without a float32 Cholesky factor). Partly dead inputs
    are zeroed (the reference's fallback) and counted in ``info["dead_inputs"]``. Under
    ``jax.jit`` the value checks are skipped (``H`` is a tracer) and the count is traced."""
    del key  # deterministic
    if not isinstance(cfg, GPTQConfig):
        raise TypeError(f"GPTQ: cfg must be a GPTQConfig, got {type(cfg).__name__}")
    check_input(W, "GPTQ weight")
    if W.ndim != 2:
        raise ValueError(f"GPTQ: W must be 2-D [out, in], got shape {tuple(W.shape)}")
    if stats.H is None:
        raise ValueError("GPTQ needs LayerStats.H (= 2XXᵀ of the layer's inputs)")
    n = W.shape[1]
    check_input(stats.H, "GPTQ Hessian")
    if stats.H.shape != (n, n):
        raise ValueError(f"GPTQ: H has shape {tuple(stats.H.shape)}, expected ({n}, {n})")
    check_groups(n, cfg.group_size, ragged=cfg.ragged, who="GPTQ")
    dead = so.check_hessian(stats.H, who="GPTQ")
    C, S, Z, loss = gptq(W, stats.H, cfg)
    so.check_solved(loss, who="GPTQ", percdamp=cfg.percdamp)
    g = cfg.group_size or n
    how = cfg.quant_config()
    qa = QArray(
        codes=C,
        scale=S.astype(jnp.dtype(cfg.scale_dtype)),
        zero=Z if how.zero_point else None,
        format=how.fmt,
        block_shape=(1, g),
        shape=tuple(W.shape),
        dtype=W.dtype,
    )
    return LayerResult(qa, {"loss": loss, "dead_inputs": dead})
