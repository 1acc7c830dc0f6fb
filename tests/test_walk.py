"""The block-walk driver (methods/walk.py ``walk_blocks``): what feeds the next block, the
report's timing, the data-free path, resume, and bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness import capture
from harness.model import BLOCK_LINEARS, Model, ModelConfig, get_param, init_params, set_param
from methods.walk import walk_blocks
from numerics.config import rtn
from numerics.quantize import quantize

TINY = ModelConfig(
    vocab_size=61, d_model=32, n_layers=3, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=48
)
QCFG = rtn(2, group_size=16)


def _tokens():
    return jax.random.randint(jax.random.key(0), (2, 8), 0, 61, dtype=jnp.int32)


def _rtn_block(bp):
    for n in BLOCK_LINEARS:
        bp = set_param(bp, n, quantize(get_param(bp, n), QCFG))
    return bp


class _Recorder:
    """A block step that RTN-quantizes every linear and records what it was given."""

    def __init__(self, timed=False):
        self.inputs, self.calls, self.timed = {}, [], timed

    def __call__(self, i, bp, calib):
        self.calls.append(i)
        if calib is not None:
            self.inputs[i] = np.asarray(calib.inputs)
        rows = [{"name": f"blocks.{i}.{n}", "bits": 2.0} for n in BLOCK_LINEARS]
        if self.timed:
            rows = [r | {"seconds": 123.0} for r in rows]
        return _rtn_block(bp), rows


def _walk(step, **kw):
    kw = {"run_parts": ("test",), "accumulators": {}, "names": (), "batch_size": 2} | kw
    return walk_blocks(init_params(TINY, 0), TINY, _tokens(), step, **kw)


@pytest.mark.parametrize("propagate", ["quantized", "fp"])
def test_next_block_sees_what_propagate_says(propagate):
    params, model = init_params(TINY, 0), Model(TINY)
    step = _Recorder()
    qm = _walk(step, propagate=propagate)
    h = model.embed(params, _tokens())
    for i in range(TINY.n_layers):
        # the walk's jitted, batched forward vs this eager one: float32 fusion order differs
        # (seen: 1.25e-6 on one element of 512); a wrong block input differs by O(1)
        np.testing.assert_allclose(step.inputs[i], np.asarray(h), rtol=1e-5, atol=1e-5)
        bq = _rtn_block(params["blocks"][i])
        h = model.apply_block(bq if propagate == "quantized" else params["blocks"][i], i, h)
    for name in (f"blocks.{i}.{n}" for i in range(TINY.n_layers) for n in BLOCK_LINEARS):
        np.testing.assert_array_equal(  # the result holds the quantized blocks either way
            get_param(qm.params, name).codes, quantize(get_param(params, name), QCFG).codes
        )
    assert qm.bits_per_weight == 2.0 and len(qm.report) == 7 * TINY.n_layers


def test_seconds_are_the_steps_or_an_even_share():
    qm = _walk(_Recorder(timed=True))
    assert all(r["seconds"] == 123.0 for r in qm.report)
    qm = _walk(_Recorder())
    per_block = [[r["seconds"] for r in qm.report[7 * i : 7 * i + 7]] for i in range(3)]
    assert all(len(set(s)) == 1 and s[0] > 0 for s in per_block)  # one share per block
    assert qm.seconds >= sum(sum(s) for s in per_block)


def test_data_free_runs_no_forward(monkeypatch):
    def no_forward(*a, **kw):
        raise AssertionError("the data-free walk ran the calibration forward")

    monkeypatch.setattr(capture, "sequential", no_forward)
    step = _Recorder()
    qm = _walk(step, accumulators=None)
    assert step.calls == [0, 1, 2] and step.inputs == {} and len(qm.report) == 21


def test_resume_skips_saved_blocks_and_forwards_them(tmp_path):
    full_step = _Recorder()
    full = _walk(full_step, propagate="fp")

    def stop(i):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _walk(_Recorder(), propagate="fp", checkpoint_dir=tmp_path, on_block_done=stop)
    step = _Recorder()
    resumed = _walk(step, propagate="fp", checkpoint_dir=tmp_path)
    assert step.calls == [1, 2]
    for i in (1, 2):  # the fp block 0 fed block 1, as in the uninterrupted run
        np.testing.assert_array_equal(step.inputs[i], full_step.inputs[i])
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["name"] for r in resumed.report] == [r["name"] for r in full.report]
    with pytest.raises(ValueError, match="different quantization run"):
        _walk(_Recorder(), run_parts=("other",), checkpoint_dir=tmp_path)


def test_bad_propagate():
    with pytest.raises(ValueError, match="propagate"):
        _walk(_Recorder(), propagate="both")
