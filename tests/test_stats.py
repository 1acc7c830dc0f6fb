"""harness.stats: the open registry of calibration statistics, and the capture of the key /
value / block-output sites (streamed values equal the ones computed directly)."""

import jax.numpy as jnp
import numpy as np
import pytest

from harness import stats
from harness.capture import sequential
from harness.model import KV_SITES, OUTPUT_SITE, Model, ModelConfig, init_params
from methods.base import LayerStats, Method, register

CFG = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48
)


def test_registry_rejects_duplicates_unknown_names_and_bad_sites():
    with pytest.raises(ValueError, match="already registered"):
        stats.register(stats.get("H"))
    with pytest.raises(ValueError, match="unknown calibration statistic 'Hessian'"):
        stats.get("Hessian")
    with pytest.raises(ValueError, match="site"):
        stats.Statistic(name="x", site="attn.q", make=None, value=lambda s: s, doc="")
    with pytest.raises(ValueError, match="external"):
        stats.Statistic(name="x", site="linear", make=None, value=lambda s: s, doc="")
    with pytest.raises(ValueError, match="unknown calibration statistic"):
        LayerStats(Hessian=jnp.eye(2))
    with pytest.raises(ValueError, match="unknown calibration statistic"):
        register(Method(name="bad", config=object, quantize_model=print, paper="-", needs=("Q",)))


def test_layer_stats_reads_registered_names():
    st = LayerStats(H=jnp.eye(3), fisher=None)
    assert st.H.shape == (3, 3) and st.fisher is None and st.act_absmax is None
    assert set(st) == {"H"}
    with pytest.raises(AttributeError, match="no statistic"):
        _ = st.Hessian
    with pytest.raises(AttributeError):
        st.H = None


def test_plan_splits_sites_and_shares_accumulators():
    linear, sites = stats.plan(
        ("H", "act_absmax", "k_absmax", "v_sample", "output_absmax", "fisher")
    )
    assert set(linear) == {"H", "act_absmax"}
    assert set(sites) == {"attn.k", "attn.v", OUTPUT_SITE}
    assert linear["H"] is stats.plan(("H",))[0]["H"]  # one object: jitted steps are cached on it


def test_captured_sites_equal_direct_values():
    params = init_params(CFG, 0)
    tokens = np.random.default_rng(0).integers(0, 64, size=(6, 12)).astype(np.int32)
    names = ("act_max", "act_min", "token_absmax", "k_pre_rope_absmax", "k_absmax", "v_absmax",
             "v_sample", "output_absmax")  # fmt: skip
    linear, sites = stats.plan(names)
    got = {}

    def on_block(i, bp, calib):
        got[i] = {"q": calib["attn.q_proj"]} | {s: calib[s] for s in sites}
        return bp

    sequential(params, CFG, tokens, on_block, accumulators=linear, sites=sites, batch_size=4)
    model = Model(CFG)
    h = model.embed(params, tokens)
    for i in range(CFG.n_layers):
        out, ins = model.apply_block(params["blocks"][i], i, h, capture=True)
        x = np.asarray(ins["attn.q_proj"]).reshape(-1, CFG.d_model)
        v = stats.values(got[i]["q"])
        np.testing.assert_allclose(np.asarray(v["act_max"]), x.max(0), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(v["act_min"]), x.min(0), rtol=1e-6)
        assert sorted(np.asarray(v["token_absmax"])) == pytest.approx(sorted(np.abs(x).max(1)))
        for site, name in zip(KV_SITES, ("k_pre_rope_absmax", "k_absmax", "v_absmax"), strict=True):
            a = np.abs(np.asarray(ins[site])).reshape(-1, 16).max(0)
            np.testing.assert_allclose(np.asarray(got[i][site][name]), a, rtol=1e-6)
        assert stats.values({"v_sample": got[i]["attn.v"]["v_sample"]})["v_sample"].shape == (
            72,
            16,
        )
        o = np.abs(np.asarray(out)).reshape(-1, CFG.d_model).max(0)
        np.testing.assert_allclose(np.asarray(got[i][OUTPUT_SITE]["output_absmax"]), o, rtol=1e-6)
        h = out
