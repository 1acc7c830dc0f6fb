"""How often FlashDecoding++'s unified-maximum softmax falls back (arXiv 2311.01282, §3).

PYTHONPATH=. LOWBIT_DATA_DIR=/work/shared/data .venv/bin/python scripts/fdpp_fallback.py

φ per layer is calibrated on C4 (16 × 512 segments, seed 0) from the scaled attention logits
``s = q·k / √d`` of every head and query row: two rules, each for the two safe ranges of
``kernels.kv_decode`` (``F32_SAFE``: float32 accumulation, the kernel's arithmetic;
``F16_SAFE``: fp16's exp, the paper's kernels):

* ``max`` — φ is the largest calibration logit (a stand-in for every row's maximum);
* ``centred`` — φ puts the calibration rows' maxima (their min … max) in the middle of the
  safe range.

Then every decoding row at context 2048 — each query position ``t`` of the first 4 windows of
2048 tokens of WikiText-2 and of C4, attending ``s ≤ t``, every head and layer, exactly the rows
a decode step at length ``t + 1`` computes — is checked with ``kernels.kv_decode
.needs_fallback`` (its maximum ``m`` outside ``φ + [a, b]``). Prints the fraction of rows that
fall back, overall and for the worst layer.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from harness.calibration import c4_calibration
from harness.data import perplexity_text
from harness.layers import NO_HOOKS, apply_rope, linear
from harness.model import default_positions
from harness.pipeline import load
from harness.structure import get_param, maybe_param
from kernels.kv_decode import F16_SAFE, F32_SAFE, needs_fallback

RANGES = {"F32_SAFE": F32_SAFE, "F16_SAFE": F16_SAFE}


def layer_row_max(model, params, tokens):
    """Per layer, the row maxima of the causal scaled logits ``[B, H, T]`` (float32)."""
    cfg = model.cfg
    h = model.embed(params, jnp.asarray(tokens))
    out = []
    for i in range(cfg.n_layers):
        bp = params["blocks"][i]
        h_next, got = model.apply_block(bp, i, h, capture=True)
        x = got["attn.q_proj"]
        q = linear(x, get_param(bp, "attn.q_proj"), maybe_param(bp, "attn.q_proj_bias"),
                   name=f"blocks.{i}.attn.q_proj", hooks=NO_HOOKS)  # fmt: skip
        B, T, _ = q.shape
        q = q.reshape(B, T, cfg.n_heads, cfg.head_dim)
        if cfg.qk_norm:
            raise ValueError("q_norm is not reproduced here; use a model without qk_norm")
        q = apply_rope(q, default_positions(q), cfg.rope_inv_freq(i))
        k = got["attn.k"].reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        out.append(np.asarray(_row_max(q, k, cfg.scale, cfg.window(i))))
        h = h_next
    return out


@jax.jit
def _causal(s):
    T = s.shape[-1]
    return jnp.where(jnp.tril(jnp.ones((T, T), bool))[None, None], s, -jnp.inf)


def _row_max(q, k, scale, window):
    B, T, H, D = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, T, KV, H // KV, D).astype(jnp.float32)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * jnp.float32(scale)
    s = _causal(s.reshape(B, H, T, T))
    if window is not None:
        t = jnp.arange(T)
        s = jnp.where((t[:, None] - t[None, :] < window)[None, None], s, -jnp.inf)
    return jnp.max(s, axis=-1)


def calibrate(row_max_layers, logit_max_layers, safe, rule):
    a, b = safe
    if rule == "max":
        return [float(m) for m in logit_max_layers]
    return [float((r.min() + r.max()) / 2 - (a + b) / 2) for r in row_max_layers]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--n-calib", type=int, default=16)
    args = ap.parse_args()

    model, params, tok = load(args.model)
    calib = c4_calibration(tok, n_samples=args.n_calib, seqlen=512, seed=0)
    per_layer = [[] for _ in range(model.cfg.n_layers)]
    for j in range(0, len(calib), 4):
        for i, r in enumerate(layer_row_max(model, params, calib[j : j + 4])):
            per_layer[i].append(r.ravel())
    cal_rows = [np.concatenate(r) for r in per_layer]
    cal_max = [r.max() for r in cal_rows]  # the largest logit is the largest row maximum
    print(f"calibration: {len(calib)} x 512 C4 rows; per-layer row max range "
          f"{min(r.min() for r in cal_rows):.2f} … {max(cal_max):.2f}")  # fmt: skip
    evals = {}
    for corpus in ("wikitext2", "c4"):
        ids = np.asarray(tok.encode(perplexity_text(corpus)), np.int32)
        n = min(args.windows, len(ids) // args.seqlen)
        rows = [[] for _ in range(model.cfg.n_layers)]
        for w in range(n):
            win = ids[None, w * args.seqlen : (w + 1) * args.seqlen]
            for i, r in enumerate(layer_row_max(model, params, win)):
                rows[i].append(r.ravel())
        evals[corpus] = [np.concatenate(r) for r in rows]
        print(f"{corpus}: {n} windows of {args.seqlen}, {evals[corpus][0].size} rows per layer")
    print(f"{'corpus':>9} {'rule':>8} {'range':>8} {'fallback rows':>14} {'worst layer':>16}")
    for corpus, rows in evals.items():
        for rule in ("max", "centred"):
            for rname, safe in RANGES.items():
                phi = calibrate(cal_rows, cal_max, safe, rule)
                fb = [np.asarray(needs_fallback(jnp.asarray(r), p, safe)) for r, p in
                      zip(rows, phi, strict=True)]  # fmt: skip
                tot = sum(f.sum() for f in fb) / sum(f.size for f in fb)
                worst = int(np.argmax([f.mean() for f in fb]))
                print(f"{corpus:>9} {rule:>8} {rname:>8} {100 * tot:>13.4f}% "
                      f"{worst:>6} ({100 * fb[worst].mean():.3f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
