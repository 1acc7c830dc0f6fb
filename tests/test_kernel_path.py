"""The kernel path (``harness.kernel_path``) vs the fake-quantized model (issue 5, Integration).

A tiny random decoder (``harness.model.init_params``) has every linear — the seven of its block
and an untied ``lm_head`` — replaced by an RTN ``QArray``; the formats cycle over INT4 g32
asymmetric, INT3 g64, INT2 g32 asymmetric, NF4 g32 and MXFP4 (FP4 E2M1, E8M0 scales, g32), so
one compilation covers all five. The fake-quantized model is the same params through the plain
seam (``QArray.dequantize()`` then an XLA dot); the kernel path is ``kernel_hooks`` (Pallas
interpret mode on CPU, compiled on a GPU in the ``gpu``-marked variant).

Tolerances (float32 summation order only):

* per linear, with the input the kernel path actually fed it: ``|y_kernel − y_plain| ≤
  kernels.dot_error_bound`` — Higham's rigorous ``γ_K·|x|·|Ŵ|ᵀ`` per side. It holds only if
  both sides multiply the *same* float32 weights (the kernel's dequantized tile is bit-identical
  to ``dequantize()``), so a dequantization difference would break it.
* logits: ``max|Δ| ≤ 1e-5 · max|logits|`` (≈ 168 u, u = 2⁻²⁴). One product of length K ≤ 128
  changes by at most ``γ_K ≤ 128 u`` relative to ``|x|·|Ŵ|`` when its summation order changes,
  typically ``~√K u ≈ 11 u``; a block plus the head chain a handful of such products through
  O(1)-gain maps (RMSNorm, softmax, SwiGLU, residual), measured here at about 10 u. The negative
  control shows the tolerance is not loose: *one* code of *one* weight moved by one grid step
  moves the logits by far more (a dequantization mismatch is at least that large).
* perplexity: ``|ppl_kernel / ppl_fq − 1| < 1e-5``. Each token's NLL is ``logsumexp(z) − z_t``,
  2-Lipschitz in ``max|Δz|``, so ``|Δnll| ≤ 2·max|Δlogits|`` ≈ 5e-6 here, and
  ``ppl = exp(nll)`` moves by that much relative.

The tiles are forced to ``block_k = 32, split_k = 2, block_n = 16`` so that every product is
split into several K tiles and two split-K partial sums: the default tiles cover these tiny K in
one step, which on CPU made the two paths bit-identical (observed) and would not exercise the
tolerance.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.tree_util import Partial

from harness.evaluate import EvalConfig, PerplexityConfig, perplexity
from harness.kernel_path import (
    KernelMatmul,
    kernel_hooks,
    kernel_matmul,
    pack_quantized,
)
from harness.layers import NO_HOOKS, Hooks, linear
from harness.model import Model, ModelConfig, get_param, init_params, linear_names, set_param
from kernels import dot_error_bound
from numerics.config import QuantConfig, mx, rtn
from numerics.qarray import QArray
from numerics.quantize import quantize

ON_GPU = jax.devices()[0].platform == "gpu"
MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(
        False,
        id="compiled",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU")],
    ),
]

FORMATS = {
    "int4_g32_asym": rtn(4, group_size=32, sym=False),
    "int3_g64": rtn(3, group_size=64),
    "int2_g32_asym": rtn(2, group_size=32, sym=False),
    "nf4_g32": QuantConfig(format="nf4", granularity="group", group_size=32),
    "mxfp4": mx("mxfp4"),
}
TILES = {"block_k": 32, "split_k": 2, "block_n": 16}  # several K tiles + split-K in every product
LOGIT_RTOL = 1e-5  # of max|logits|; see the module docstring
PPL_RTOL = 1e-5

# N = 128 / 64 / 32 (multiples of 16), K = 64 / 128 (multiples of every group size used).
CFG = ModelConfig(
    vocab_size=128, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128,
    tie_embeddings=False,
)  # fmt: skip
NAMES = linear_names(CFG) + ["lm_head"]


def _quantize_linears(cfg: ModelConfig, p: dict) -> tuple[dict, dict[str, str]]:
    """``p`` with every linear an (unpacked) RTN QArray, the formats cycling over FORMATS."""
    names = linear_names(cfg) + ([] if cfg.tie_embeddings else ["lm_head"])
    which = {}
    for i, name in enumerate(names):
        fmt = sorted(FORMATS)[i % len(FORMATS)]
        p = set_param(p, name, quantize(get_param(p, name), FORMATS[fmt]))
        which[name] = fmt
    return p, which


def _quantized_params() -> tuple[dict, dict[str, str]]:
    return _quantize_linears(CFG, init_params(CFG, seed=0))


def _recording_forward(interpret: bool):
    """A jitted forward through the kernel path that also returns, per linear, its input and
    both products (the kernel's, and the plain seam's on that same input)."""
    mm = KernelMatmul(interpret=interpret, tiles=tuple(sorted(TILES.items())))

    def run(p, tokens):
        seen = {}

        def hook(name, x, w):
            y = mm(name, x, w)
            seen[name] = (x, y, linear(x, w, name=name))
            return y

        return Model(CFG, Hooks(matmul=hook)).forward(p, tokens), seen

    return jax.jit(run)


def _f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


@pytest.mark.parametrize("interpret", MODES)
def test_kernel_path_logits_equal_fake_quant(interpret):
    """Every linear within the summation-order bound, logits within LOGIT_RTOL; the leaves are
    left unpacked here (the kernel path packs them per call)."""
    p, which = _quantized_params()
    assert set(which.values()) == set(FORMATS)  # every format is in the model
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 32)), jnp.int32)
    fq_forward = jax.jit(Model(CFG).forward)
    with jax.default_matmul_precision("highest"):  # no TF32 in the plain seam on GPUs
        logits_k, seen = _recording_forward(interpret)(p, tokens)
        logits_fq = fq_forward(p, tokens)

    assert sorted(seen) == sorted(NAMES)
    for name, (x, y_k, y_plain) in seen.items():
        w = get_param(p, name)
        assert isinstance(w, QArray) and y_k.dtype == y_plain.dtype == jnp.float32
        x2, W = _f64(x).reshape(-1, x.shape[-1]), _f64(w.dequantize())
        bound = dot_error_bound(
            np.abs(x2) @ np.abs(W).T, _f64(y_plain).reshape(x2.shape[0], -1), W.shape[1],
            jnp.float32, products_exact=False,
        )  # fmt: skip
        err = np.abs(_f64(y_k) - _f64(y_plain)).reshape(bound.shape)
        assert np.all(err <= bound), f"{name} ({which[name]}): excess {np.max(err - bound)}"

    lk, lf = np.asarray(logits_k), np.asarray(logits_fq)
    assert lk.shape == (2, 32, CFG.vocab_size) and np.all(np.isfinite(lk))
    tol = LOGIT_RTOL * np.abs(lf).max()
    assert np.abs(lk - lf).max() <= tol, f"max |Δlogits| {np.abs(lk - lf).max()} > {tol}"

    # negative control: one code of one weight one step off moves the logits far beyond tol
    qa = get_param(p, "blocks.0.mlp.down_proj")
    codes = qa.codes.at[0, 0].set(qa.codes[0, 0] ^ np.uint8(1))
    p_bad = set_param(p, "blocks.0.mlp.down_proj", dataclasses.replace(qa, codes=codes))
    with jax.default_matmul_precision("highest"):
        lbad = np.asarray(fq_forward(p_bad, tokens))
    assert np.abs(lbad - lf).max() > 20 * tol


@pytest.mark.parametrize("interpret", MODES)
def test_kernel_path_perplexity_equals_fake_quant(interpret):
    """harness.evaluate.perplexity (jitted, batch sharded over all devices) on 8 synthetic
    windows of 32 tokens, packed leaves (pack_quantized), forced multi-tile products."""
    p, _ = _quantized_params()
    p = pack_quantized(p)
    stream = np.random.default_rng(1).integers(0, CFG.vocab_size, 8 * 32).astype(np.int32)
    pcfg, ecfg = PerplexityConfig(seqlen=32), EvalConfig(progress=False)
    model_k = Model(CFG, kernel_hooks(interpret=interpret, **TILES))
    with jax.default_matmul_precision("highest"):
        fq = perplexity(Partial(Model(CFG).forward, p), stream, pcfg, eval_cfg=ecfg)
        kp = perplexity(Partial(model_k.forward, p), stream, pcfg, eval_cfg=ecfg)
    assert kp.tokens == fq.tokens == 8 * 31 and np.isfinite(kp.ppl)
    assert fq.ppl > 1.0
    assert abs(kp.ppl / fq.ppl - 1.0) < PPL_RTOL, (kp.ppl, fq.ppl)


@pytest.mark.slow
@pytest.mark.parametrize("interpret", MODES)
def test_smollm2_kernel_path_equals_fake_quant(interpret):
    """The real SmolLM2-135M (30 blocks, K = 576 / 1536), its 210 block linears RTN-quantized
    in the five formats (cycling; the tied embedding / head stays float), one 64-token window
    of WikiText-2, default tiles: logits within LOGIT_RTOL, perplexity within PPL_RTOL.
    Interpret mode on CPU: about 2.5 min in all. Measured: max|Δlogits| = 1.2e-4 of
    max|logits| = 33 (59 u relative, 30 blocks deep), perplexities 432.697 equal to 1e-15."""
    from harness.data import perplexity_text
    from harness.pipeline import load

    try:
        model, p, tok = load("smollm2")
        text = perplexity_text("wikitext2")
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"SmolLM2 GGUF or WikiText-2 not available: {e}")
    p, which = _quantize_linears(model.cfg, p)
    assert set(which.values()) == set(FORMATS)
    p = pack_quantized(p)
    ids = np.asarray(tok.encode(text[:4000]), np.int32)[:64]
    assert ids.shape == (64,)
    model_k = Model(model.cfg, kernel_hooks(interpret=interpret))
    pcfg = PerplexityConfig(seqlen=64)
    ecfg = EvalConfig(progress=False, devices=(jax.devices()[0],))  # one row: no padding rows
    with jax.default_matmul_precision("highest"):
        lf = np.asarray(jax.jit(model.forward)(p, jnp.asarray(ids[None])))
        lk = np.asarray(jax.jit(model_k.forward)(p, jnp.asarray(ids[None])))
        fq = perplexity(Partial(model.forward, p), ids, pcfg, eval_cfg=ecfg)
        kp = perplexity(Partial(model_k.forward, p), ids, pcfg, eval_cfg=ecfg)
    tol = LOGIT_RTOL * np.abs(lf).max()
    assert np.all(np.isfinite(lk)) and np.abs(lk - lf).max() <= tol, np.abs(lk - lf).max()
    assert kp.tokens == fq.tokens == 63 and 1.0 < fq.ppl < 1e4
    assert abs(kp.ppl / fq.ppl - 1.0) < PPL_RTOL, (kp.ppl, fq.ppl)


# --------------------------------------------------------------------------- the pieces


@settings(max_examples=max(3, settings.default.max_examples // 8))
@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    state=st.sampled_from(["unpacked", "packed_in", "packed_out"]),
    n_out=st.sampled_from([16, 48]),
    seed=st.integers(0, 2**16),
)
def test_pack_quantized_packs_input_axis_losslessly(fmt, state, n_out, seed):
    W = jax.random.normal(jax.random.key(seed), (n_out, 64), jnp.float32)
    qa = quantize(W, FORMATS[fmt])
    leaf = {"unpacked": qa, "packed_in": qa.pack(axis=1), "packed_out": qa.pack(axis=0)}[state]
    b = jnp.ones((n_out,), jnp.float32)
    tree = {"w": leaf, "b": b, "blocks": [{"w": leaf}]}
    out = pack_quantized(tree)
    assert out["b"] is b
    for got in (out["w"], out["blocks"][0]["w"]):
        assert isinstance(got, QArray) and got.packing == (1, 32)
        assert got.codes.dtype == jnp.uint32
        assert got.codes.shape == (n_out, 64 * qa.format.bits // 32)
        np.testing.assert_array_equal(np.asarray(got.dequantize()), np.asarray(qa.dequantize()))
    again = pack_quantized(out)
    assert again["w"] is out["w"]  # already in the kernels' layout: kept


def test_kernel_matmul_routes_leaves():
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (2, 5, 64), jnp.float32)
    W = jax.random.normal(kw, (32, 64), jnp.float32)
    # float leaf: the plain seam's product, bit for bit
    np.testing.assert_array_equal(
        np.asarray(kernel_matmul("f", x, W, interpret=True)), np.asarray(linear(x, W, name="f"))
    )
    # packed and unpacked QArrays: the same kernel call, the same result
    qa = quantize(W, FORMATS["int4_g32_asym"])
    y_un = kernel_matmul("q", x, qa, interpret=True)
    y_pk = kernel_matmul("q", x, qa.pack(axis=1), interpret=True)
    assert y_un.shape == (2, 5, 32) and y_un.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y_un), np.asarray(y_pk))

    @dataclasses.dataclass(frozen=True)
    class OtherQuant:  # a quantized leaf type the kernels cannot read
        w: jax.Array

        def dequantize(self):
            return self.w

    with pytest.raises(TypeError, match="other.*OtherQuant.*dense_fallback"):
        kernel_matmul("other", x, OtherQuant(W), interpret=True)
    np.testing.assert_array_equal(
        np.asarray(kernel_matmul("other", x, OtherQuant(W), interpret=True, dense_fallback=True)),
        np.asarray(linear(x, W, name="other")),
    )


def test_kernel_path_errors_name_the_layer_and_option():
    x = jnp.ones((3, 64), jnp.float32)
    qa = quantize(jnp.ones((40, 64), jnp.float32), FORMATS["int4_g32_asym"])  # N = 40
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj: .*N=40"):
        kernel_matmul("blocks.0.attn.q_proj", x, qa, interpret=True)
    with pytest.raises(ValueError, match="unknown tile option.*block_q"):
        kernel_hooks(interpret=True, block_q=32)
    with pytest.raises(ValueError, match="split_k must be a positive int"):
        kernel_hooks(interpret=True, split_k=0)
    with pytest.raises(TypeError, match="interpret must be a bool"):
        kernel_hooks(interpret=1)
    with pytest.raises(ValueError, match="already sets a matmul"):
        kernel_hooks(interpret=True, base=Hooks(matmul=lambda n, x, w: x))
    with pytest.raises(ValueError, match="0-d QArray"):
        pack_quantized({"w": dataclasses.replace(qa, shape=())})


def test_kernel_hooks_are_equal_for_equal_arguments():
    """A rebuilt Hooks hashes equal, so jit does not recompile; base hooks are kept."""
    aq = lambda name, x: x  # noqa: E731
    h1 = kernel_hooks(interpret=True, base=Hooks(act_quant=aq), block_k=32, split_k=None)
    h2 = kernel_hooks(interpret=True, base=Hooks(act_quant=aq), block_k=32)
    assert h1 == h2 and hash(h1) == hash(h2)
    assert h1.act_quant is aq and isinstance(h1.matmul, KernelMatmul)
    assert h1.matmul.tiles == (("block_k", 32),)
    assert kernel_hooks(interpret=False) != kernel_hooks(interpret=True)
    assert kernel_hooks(interpret=True).kv_quant is None and NO_HOOKS.matmul is None
