"""The kernel path of decoding (``Decoder(..., attention="kernel")``) against the reference
path (dequantize the whole cache, then attend), and the step's compile count.

Tolerance of the logits: both paths read bit-identical dequantized keys and values (the same
codes, zero points and scales; ``test_kivi_kernel_layout_is_the_store`` checks it) and differ
only in float32 summation order — the kernel's online softmax, the separate window / sink
part and the log-sum-exp merge. Per attention output that is
``|Δo| ≤ (2ε + 4γ_T)·max|v|`` with ``ε ≲ 2γ_D·|q||k|·scale + (T/Gk + 4)·5u`` (the bound of
``tests/test_kernels_kv_decode.py``): ~1e-5 relative for ``T ≤ 128`` and unit-scale
activations. Two blocks of a random-init model (norms, residuals, O(1) gains) carry it to the
logits at the same relative size, so ``1e-4 · max|logits|`` leaves a 10× margin; a wrong
split of the tokens between the parts (one token dropped or double-counted) moves the logits
by O(1/T) of their size, 1e-2 here, far outside it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness import kvcache
from harness.decode import Decoder
from harness.layers import Hooks
from harness.model import Model, ModelConfig, init_params
from kernels.kv_decode import dequantize_cache
from methods.kivi import KIVIConfig, kv_quant

CFG = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                  d_ff=64, max_seq_len=256)  # fmt: skip
LOCAL = dataclasses.replace(CFG, sliding_window=24, layer_types=("local", "global"))
KIVI = kv_quant(KIVIConfig(bits=2, group=32, residual=32))
CAP = 128
RTOL = 1e-4


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, 0)


def _tokens(seed, shape):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, size=shape).astype(np.int32)


def _run(dec, params, prompt, n):
    logits, st = dec.prefill(params, prompt)
    out = []
    for i in range(n):
        lg, st = dec.step(params, st, _tokens(100 + i, (prompt.shape[0],)))
        out.append(np.asarray(lg))
    return np.stack(out, 1), st


@pytest.mark.parametrize(
    "cfg, kvq, P, n",
    [
        # KIVI: keys flush at L = 65 and 97 (window 1, flush 32), values leave the window of
        # 32 one per step; steps 41 … 100 cover both flushes and the full-precision window
        pytest.param(CFG, KIVI, 40, 60, id="kivi"),
        # sink tokens attended apart; a sliding window (layer 0) moves the kernel's start
        pytest.param(LOCAL, dataclasses.replace(KIVI, sink=4), 30, 40, id="sink-window"),
        pytest.param(
            CFG, kv_quant(KIVIConfig(bits=4, group=32, residual=32)), 3, 70, id="kivi4-short-prompt"
        ),  # fmt: skip
    ],
)
def test_kernel_step_logits_equal_reference(params, cfg, kvq, P, n):
    model = Model(cfg, Hooks(kv_quant=kvq))
    prm = params if cfg is CFG else init_params(cfg, 0)
    prompt = _tokens(P, (2, P))
    ref, st_r = _run(Decoder(model, CAP), prm, prompt, n)
    ker, st_k = _run(Decoder(model, CAP, attention="kernel"), prm, prompt, n)
    assert st_r.length == st_k.length == P + n
    scale = np.abs(ref).max()
    assert np.abs(ker - ref).max() <= RTOL * scale, np.abs(ker - ref).max() / scale


def test_kernel_generate_matches_reference(params):
    model = Model(CFG, Hooks(kv_quant=KIVI))
    prompt = _tokens(7, (1, 20))
    a = Decoder(model, CAP).generate(params, prompt, max_new_tokens=50)
    b = Decoder(model, CAP, attention="kernel").generate(params, prompt, max_new_tokens=50)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert np.abs(a.logits - b.logits).max() <= RTOL * np.abs(a.logits).max()


def test_kivi_kernel_layout_is_the_store(params):
    """The codecs' kernel layout, dequantized by the kernel's formula, is bit for bit what
    ``kvcache.read`` gives for the quantized prefix."""
    model = Model(CFG, Hooks(kv_quant=KIVI))
    _, st = Decoder(model, CAP).prefill(params, _tokens(1, (2, 100)))
    layer = st.layers[1]
    K, V = kvcache.read(KIVI, 1, layer, 100)
    for side, codec, X in (("k", KIVI.key, K), ("v", KIVI.value, V)):
        lay = codec.kernel_layout(1, layer[side + "q"])
        assert lay.codes.dtype == jnp.uint32 and lay.codes.shape == (2, 2, CAP, 32 * 2 // 32)
        Xk = dequantize_cache(lay.codes, lay.scale, lay.zero, lay.format, lay.group)
        Q = kvcache.quantized_prefix(codec, 100)
        Xr = jnp.transpose(X, (0, 2, 1, 3))[:, :, :Q]
        np.testing.assert_array_equal(np.asarray(Xk[:, :, :Q]), np.asarray(Xr))


def test_kernel_unified_max_in_decoder(params):
    """FlashDecoding++'s unified maximum on the decoding path: any φ gives the reference's
    logits (in range: exact up to reassociation; out of range: the fallback recomputes)."""
    model = Model(CFG, Hooks(kv_quant=KIVI))
    prompt = _tokens(3, (2, 60))
    ref, _ = _run(Decoder(model, CAP), params, prompt, 10)
    for phi in ((0.0, 0.0), (-200.0, 300.0)):  # logits here are O(1): in range, both fall back
        ker, _ = _run(Decoder(model, CAP, attention="kernel", phi=phi), params, prompt, 10)
        assert np.abs(ker - ref).max() <= RTOL * np.abs(ref).max(), phi


def test_kernel_path_refusals(params):
    pre = dataclasses.replace(KIVI, pre_rope=True)
    with pytest.raises(ValueError, match="quantized before RoPE"):
        Decoder(Model(CFG, Hooks(kv_quant=pre)), CAP, attention="kernel")
    with pytest.raises(ValueError, match="no kernel layout"):
        Decoder(Model(CFG), CAP, attention="kernel")
    with pytest.raises(ValueError, match="attention must be"):
        Decoder(Model(CFG), CAP, attention="flash")
    with pytest.raises(ValueError, match="need attention='kernel'"):
        Decoder(Model(CFG), CAP, phi=(0.0, 0.0))
    with pytest.raises(ValueError, match="one per layer"):
        Decoder(Model(CFG, Hooks(kv_quant=KIVI)), CAP, attention="kernel", phi=(0.0,))
    with pytest.raises(ValueError, match="safe range"):
        Decoder(Model(CFG, Hooks(kv_quant=KIVI)), CAP, attention="kernel", safe=(1.0, 2.0))


@pytest.fixture
def compiles():
    """Count XLA backend compilations while the test runs."""
    events = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


@pytest.mark.parametrize(
    "hooks, attention",
    [
        pytest.param(Hooks(), "reference", id="fp"),
        pytest.param(Hooks(kv_quant=KIVI), "reference", id="kivi"),
        pytest.param(Hooks(kv_quant=KIVI), "kernel", id="kivi-kernel"),
    ],
)
def test_steps_do_not_recompile(params, compiles, hooks, attention):
    """After the first step, decoding (across flushes and a full ring) compiles nothing."""
    dec = Decoder(Model(CFG, hooks), CAP, attention=attention)
    _, st = dec.prefill(params, _tokens(2, (1, 30)))
    _, st = dec.step(params, st, np.zeros(1, np.int32))
    jax.block_until_ready(st.layers)
    compiles.clear()
    for i in range(40):  # L = 32 … 71: key flush at 65, value window full from 33
        lg, st = dec.step(params, st, np.full(1, i % CFG.vocab_size, np.int32))
    jax.block_until_ready(lg)
    assert compiles == [], f"{len(compiles)} compilations over 40 steps"
