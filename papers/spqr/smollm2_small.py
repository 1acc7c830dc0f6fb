"""Reduced-size SmolLM2-135M run of SpQR and SqueezeLLM beside RTN: WikiText-2 perplexity.

Calibration: ``--n-calib`` C4 segments of ``--calib-len`` tokens (seed 0); evaluation: the first
``--windows`` windows of ``--seqlen`` tokens of WikiText-2 test (GPTQ protocol). Prints one
markdown row per method: bits per weight (numerics accounting, scales/zeros/outliers
included), perplexity, minutes to quantize. Used by papers/spqr and papers/squeezellm:

    .venv/bin/python papers/spqr/smollm2_small.py --n-calib 16 --calib-len 512 --windows 4
"""

import argparse
import time

import jax
import numpy as np

from harness.calibration import c4_calibration
from harness.evaluate import EvalConfig, PerplexityConfig, corpus_perplexity
from harness.pipeline import load, logits_fn
from methods.rtn import RTNConfig
from methods.rtn import quantize_model as rtn_model
from methods.spqr import SpQRConfig
from methods.spqr import quantize_model as spqr_model
from methods.squeezellm import SqueezeLLMConfig, fisher_information
from methods.squeezellm import quantize_model as squeezellm_model

RUNS = {
    "fp": None,
    "rtn_w3g64": lambda p, c, t: rtn_model(p, c, t, RTNConfig(bits=3, group_size=64)),
    "rtn_w3g16": lambda p, c, t: rtn_model(p, c, t, RTNConfig(bits=3, group_size=16)),
    "spqr_w3": lambda p, c, t: spqr_model(p, c, t, SpQRConfig()),
    "spqr_w3_no_outliers": lambda p, c, t: spqr_model(
        p, c, t, SpQRConfig(outlier_threshold=float("inf"))
    ),
    "squeezellm_w3_dense": lambda p, c, t: squeezellm_model(
        p, c, t, SqueezeLLMConfig(outlier_fraction=0.0), fisher=FISHER[0]
    ),
    "squeezellm_w3_0.45%": lambda p, c, t: squeezellm_model(
        p, c, t, SqueezeLLMConfig(), fisher=FISHER[0]
    ),
}
FISHER: list = [None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=list(RUNS), help=" ".join(RUNS))
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    model, params, tok = load("smollm2")
    calib = np.asarray(c4_calibration(tok, n_samples=args.n_calib, seqlen=args.calib_len, seed=0))
    pcfg = PerplexityConfig(seqlen=args.seqlen, limit=args.windows)
    ecfg = EvalConfig(progress=False)
    print(
        "| method | bits/weight | wikitext2 ppl | windows × seqlen | minutes |\n"
        "|---|---|---|---|---|"
    )
    for name in args.methods:
        t0 = time.perf_counter()
        if name.startswith("squeezellm") and FISHER[0] is None:
            FISHER[0] = fisher_information(params, model.cfg, calib, 1)
        if RUNS[name] is None:
            qp, bits = params, float("nan")  # the GGUF's Q4_1 weights, dequantized to float32
        else:
            qm = RUNS[name](params, model.cfg, calib)
            qp, bits = qm.params, qm.bits_per_weight
        minutes = (time.perf_counter() - t0) / 60
        jax.clear_caches()
        res = corpus_perplexity(logits_fn(model, qp), tok, "wikitext2", pcfg, eval_cfg=ecfg)
        bits_s = "fp32 (from Q4_1)" if np.isnan(bits) else f"{bits:.3f}"
        print(
            f"| {name} | {bits_s} | {res.ppl:.3f} | {res.windows} × {res.seqlen} | {minutes:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
