"""Why does GPTQ lose to RTN end to end at W4 g128 on SmolLM2? (papers/weight_only, "Why")

GPTQ minimises each linear's output error on its calibration inputs, ``tr(ΔW H ΔWᵀ)`` with
``ΔW = Ŵ − W`` and ``H = 2/n Σ x xᵀ`` over the calibration tokens. This script asks whether
that gain carries over to other text, and which linears carry the end-to-end loss:

1. RTN and GPTQ quantize the model at one setting (``methods.compare`` defaults: 16 × 512 C4
   calibration tokens, seed 0, ragged groups).
2. The full-precision model's inputs of every linear are captured on two token sets — the C4
   calibration segments themselves ("calib") and ``--heldout`` windows of WikiText-2 test
   ("held-out") — and each linear's relative output error
   ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` is computed for both methods on both; the table prints the
   ratio GPTQ / RTN per linear type (geometric mean over blocks, and per block for one type).
3. The attention logits: q and k errors reach the loss through ``q·k``, where each of q's
   RoPE pairs (dims ``i`` and ``i + d/2`` of a head, rotated together) is multiplied by the
   matching pair of k. Assuming errors independent of the activations, the logit error energy
   from q is ``Σ_pairs E|δq_pair|² · E|k_pair|²`` (and symmetrically for k, summed over the q
   heads sharing a kv head), relative to the logit energy ``Σ E|q_pair|² · E|k_pair|²`` — a
   weighting the per-linear objective (every output dim alike) does not see. Pair energies come
   from the same held-out ``H``: ``E|q_j|² = (W H Wᵀ)_jj / 2``.
4. Ablation: start from RTN and swap in GPTQ's weights for one linear type at a time (and for
   all but v — the remedy "keep v_proj at RTN" — all but q/k and all but q/k/v), then evaluate
   perplexity with the table's protocol (first 16 windows of 512). ``--ablation-only`` skips
   steps 2–3; ``--variants`` picks variants by key (``rtn gptq q k v o gate/up down no-v no-qk
   no-qkv``).

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python scripts/diag_gptq_heldout.py --setting W4g128
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from harness import capture, kvcache
from harness.calibration import c4_calibration
from harness.data import perplexity_text
from harness.evaluate import EvalConfig, perplexity_windows
from harness.layers import Hooks, dense
from harness.model import BLOCK_LINEARS, Model, get_param, linear_names, set_param
from harness.pipeline import eval_perplexity, load
from methods.base import get_method
from methods.compare import config_for, parse_setting

TYPES = {
    "q": ("attn.q_proj",),
    "k": ("attn.k_proj",),
    "v": ("attn.v_proj",),
    "o": ("attn.o_proj",),
    "gate/up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
# ablation variants by key: (label, the linear types that get GPTQ's weights; the rest RTN's)
VARIANTS = {"rtn": ("RTN everywhere", ()), "gptq": ("GPTQ everywhere", tuple(TYPES))}
VARIANTS |= {t: (f"GPTQ on {t} only", (t,)) for t in TYPES}
for _drop in ("v", "qk", "qkv"):
    VARIANTS["no-" + _drop] = (
        f"GPTQ on all but {', '.join(_drop)}",
        tuple(t for t in TYPES if t not in tuple(_drop)),
    )


def first_token_hessian() -> capture.Accumulator:
    """``H`` over each sequence's first position only: the attention sink's input."""
    h = capture.hessian()
    return capture.Accumulator(h.init, lambda s, x: h.update(s, x[:, :1]))


def fp_hessians(params, cfg, tokens) -> dict[str, dict[str, jax.Array]]:
    """``{"H": {"blocks.i.attn.q_proj": H}, "H0": {...}}`` of the full-precision model's inputs
    on ``tokens``: over every position, and over the first position of each sequence."""
    out: dict[str, dict[str, jax.Array]] = {"H": {}, "H0": {}}

    def on_block(i, bp, calib):
        for rel in BLOCK_LINEARS:
            for k in out:
                out[k][f"blocks.{i}.{rel}"] = calib[rel][k].H
        return bp

    accs = {"H": capture.hessian(), "H0": first_token_hessian()}
    capture.sequential(params, cfg, tokens, on_block, accumulators=accs)
    return out


@jax.jit
def rel_error(W, W_hat, H):
    d = W_hat - W
    return jnp.trace(d @ H @ d.T) / jnp.trace(W @ H @ W.T)


def pair_energy(W, H, n_heads: int) -> jax.Array:
    """``E|y_pair|²`` of ``y = W x`` per head and RoPE pair (half-split layout): [heads, d/2]."""
    e = jnp.diag(W @ H @ W.T).reshape(n_heads, -1) / 2
    half = e.shape[1] // 2
    return e[:, :half] + e[:, half:]


def logit_error(params, q_params, cfg, H) -> dict[str, list[float]]:
    """Per block: relative logit error energy from q's and from k's error (see the docstring),
    with ``q_params``' quantized q/k and ``H`` the fp inputs' Hessian of the q/k/v input."""
    out: dict[str, list[float]] = {"q": [], "k": []}
    rep = cfg.n_heads // cfg.n_kv_heads
    for i in range(cfg.n_layers):
        Hi = H[f"blocks.{i}.attn.q_proj"]  # q, k and v share their input
        W = {t: jnp.asarray(get_param(params, f"blocks.{i}.attn.{t}_proj"), jnp.float32)
             for t in "qk"}  # fmt: skip
        dW = {t: dense(get_param(q_params, f"blocks.{i}.attn.{t}_proj"), jnp.float32) - W[t]
              for t in "qk"}  # fmt: skip
        eq, ek = pair_energy(W["q"], Hi, cfg.n_heads), pair_energy(W["k"], Hi, cfg.n_kv_heads)
        ek_per_q = jnp.repeat(ek, rep, axis=0)  # the kv head each query head reads
        signal = jnp.sum(eq * ek_per_q)
        dq = pair_energy(dW["q"], Hi, cfg.n_heads)
        dk = pair_energy(dW["k"], Hi, cfg.n_kv_heads)
        out["q"].append(float(jnp.sum(dq * ek_per_q) / signal))
        out["k"].append(float(jnp.sum(jnp.repeat(dk, rep, axis=0) * eq) / signal))
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class _SinkValues(kvcache.KVCodec):
    """A scoring-only value codec: every value vector 0 except position 0's, which is all ones
    — the attention output then reads, per query and head, the attention weight on position 0."""

    def fake(self, layer, x):
        return jnp.zeros_like(x).at[:, 0].set(1.0)


SINK_HOOKS = Hooks(kv_quant=kvcache.KVQuant(key=kvcache.Identity(), value=_SinkValues()))


def sink_mass(params, cfg, tokens) -> list[float]:
    """Per block: mean attention weight on position 0 over heads and query positions ≥ 1, for
    the full-precision model on ``tokens`` (each block on the fp hidden states entering it)."""
    probe = Model(cfg, SINK_HOOKS)
    out: list[float] = []

    def on_block(i, bp, calib):
        mix = probe.apply_block(bp, i, calib.inputs, capture=True)[1]["attn.o_proj"]
        out.append(float(jnp.mean(mix[:, 1:])))  # [n, t, heads * head_dim], all ones at t = 0
        return bp

    capture.sequential(params, cfg, tokens, on_block, names=())
    return out


def gmean(x) -> float:
    return float(np.exp(np.mean(np.log(np.asarray(x)))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", default="W4g128")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--heldout", type=int, default=8, help="WikiText-2 windows of 512 for H")
    ap.add_argument("--detail", default="v", choices=sorted(TYPES), help="per-block ratios")
    ap.add_argument("--sink-only", action="store_true", help="only the attention on position 0")
    ap.add_argument("--no-ablation", action="store_true", help="skip the perplexity ablation")
    ap.add_argument("--ablation-only", action="store_true", help="only the perplexity ablation")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = ap.parse_args()
    bits, group = parse_setting(args.setting)
    model, params, tok = load("smollm2")
    calib = c4_calibration(tok, n_samples=args.n_calib, seqlen=args.calib_seqlen, seed=0)
    wiki = np.asarray(tok.encode(perplexity_text("wikitext2")), np.int32)
    held, _ = perplexity_windows(wiki, seqlen=512, bos_id=tok.bos_id if tok.add_bos else None)
    if not args.ablation_only:
        mass = sink_mass(params, model.cfg, held[: args.heldout])
        print("attention weight on position 0 (fp model, held-out, mean over heads and queries):")
        print("  " + " ".join(f"{m:.2f}" for m in mass))
    if args.sink_only:
        return
    q = {}
    for name in ("rtn", "gptq"):
        m = get_method(name)
        q[name] = m.quantize_model(params, model.cfg, calib, config_for(m, bits, group))
        print(f"{name}: {q[name].bits_per_weight:.3f} bpw, {q[name].seconds / 60:.1f} min")
    if not args.ablation_only:
        error_tables(args, params, model.cfg, q, calib, held)
    if not args.no_ablation:
        ablation(args.setting, model, params, tok, q, [VARIANTS[k] for k in args.variants])


def error_tables(args, params, cfg, q, calib, held) -> None:
    """Steps 2 and 3: relative output errors per linear type, attention-logit error energy."""
    fp_stats = fp_hessians(params, cfg, held[: args.heldout])
    H = {"calib": fp_hessians(params, cfg, calib)["H"], "held-out": fp_stats["H"],
         "held-out, position 0": fp_stats["H0"]}  # fmt: skip

    err = defaultdict(dict)  # (method, set) -> {linear name: relative output error}
    for name in H["calib"]:
        W = jnp.asarray(get_param(params, name), jnp.float32)
        for method in q:
            W_hat = dense(get_param(q[method].params, name), jnp.float32)
            for s, Hs in H.items():
                err[(method, s)][name] = float(rel_error(W, W_hat, Hs[name]))

    print(f"\n## {args.setting}: GPTQ / RTN relative output error, geometric mean over blocks\n")
    print("| linears | calib (C4, in-sample) | held-out (WikiText-2) | held-out, position 0 "
          "only | blocks where GPTQ > RTN held-out (all / position 0) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for t, rels in TYPES.items():
        names = [n for n in H["calib"] if n.split(".", 2)[2] in rels]
        r = {s: [err[("gptq", s)][n] / err[("rtn", s)][n] for n in names] for s in H}
        worse = [sum(x > 1 for x in r[s]) for s in ("held-out", "held-out, position 0")]
        print(f"| {t} | {' | '.join(f'{gmean(v):.3f}' for v in r.values())} | "
              f"{worse[0]} / {worse[1]} of {len(names)} |")  # fmt: skip
    print(f"\nper block, {args.detail} ({' / '.join(H)}):")
    for n in H["calib"]:
        if n.split(".", 2)[2] in TYPES[args.detail]:
            print(f"  {n:28s} " + " / ".join(f"{err[('gptq', s)][n] / err[('rtn', s)][n]:.3f}"
                                           for s in H))  # fmt: skip

    print(f"\n## {args.setting}: relative attention-logit error energy (held-out), mean\n")
    print("| source | RTN | GPTQ | GPTQ / RTN (geo. mean of blocks) | blocks GPTQ > RTN |")
    print("|---|---:|---:|---:|---:|")
    le = {m: logit_error(params, q[m].params, cfg, H["held-out"]) for m in q}
    for t in "qk":
        r = [g / n for g, n in zip(le["gptq"][t], le["rtn"][t], strict=True)]
        print(f"| δ{t} | {np.mean(le['rtn'][t]):.2e} | {np.mean(le['gptq'][t]):.2e} | "
              f"{gmean(r):.3f} | {sum(x > 1 for x in r)} / {len(r)} |")  # fmt: skip


def ablation(setting, model, params, tok, q, variants) -> None:
    """Step 4: perplexity of RTN with GPTQ's weights swapped in for some linear types."""
    print(f"\n## {setting}: perplexity, RTN with GPTQ's weights swapped in (16 × 512)\n")
    print("| model | WikiText-2 | C4 |\n|---|---:|---:|")
    ecfg = EvalConfig(progress=False)
    for label, types in variants:
        p = q["rtn"].params
        for name in linear_names(model.cfg):
            if any(name.split(".", 2)[2] in TYPES[t] for t in types):
                p = set_param(p, name, get_param(q["gptq"].params, name))
        ppl = [
            eval_perplexity(
                model, p, tok, model_name="smollm2", corpus=c, seqlen=512, limit=16, eval_cfg=ecfg
            )[0].ppl
            for c in ("wikitext2", "c4")
        ]
        assert all(math.isfinite(x) for x in ppl), (label, ppl)
        print(f"| {label} | {ppl[0]:.2f} | {ppl[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
