"""SmoothQuant's migration-strength sweep (arXiv 2211.10438 Fig. 10's α axis) on one calibration.

Smoothing at any α needs only the full-precision inputs' ``max|X_j|``, so the model is calibrated
once (``methods.smoothquant.calibrate``, the same seeded C4 segments as the tables) and each α is
folded and quantized from those statistics (``quantize_from_stats``), then evaluated with the
GPTQ protocol. Rows (same notes as ``methods.compare``) are appended to ``--out``.{json,md}.

    .venv/bin/python scripts/smoothquant_sweep.py --level O3 --windows 2 --fp --naive \\
        --out papers/data/smoothquant_sweep_rows
"""

import argparse
import dataclasses
import time

from harness.calibration import c4_calibration
from harness.evaluate import EvalConfig
from harness.model import Model
from harness.pipeline import eval_perplexity, load
from harness.results import append_results, markdown_row
from methods.smoothquant import SmoothQuantConfig, W8A8Config, calibrate, quantize_from_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--level", default="O3", choices=["O1", "O2", "O3"])
    ap.add_argument("--corpora", nargs="+", default=["wikitext2"])
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp", action="store_true", help="also evaluate the unquantized model")
    ap.add_argument("--naive", action="store_true", help="also naive W8A8 at the same level")
    ap.add_argument("--out", default="results/smoothquant_sweep")
    args = ap.parse_args()
    for a in args.alphas:
        SmoothQuantConfig(alpha=a)  # bad alphas fail before any work
    model, params, tok = load(args.model)
    calib = c4_calibration(tok, n_samples=args.n_calib, seqlen=args.calib_seqlen, seed=args.seed)
    t0 = time.perf_counter()
    stats = calibrate(params, model.cfg, calib)
    calib_min = (time.perf_counter() - t0) / 60
    note = f"{args.n_calib}x{args.calib_seqlen} C4 (seed {args.seed})"
    ecfg = EvalConfig(progress=False)

    def evaluate(p, hooks, method, bits, notes):
        for corpus in args.corpora:
            _, row = eval_perplexity(
                Model(model.cfg, hooks), p, tok, model_name=args.model, corpus=corpus,
                seqlen=args.seqlen, limit=args.windows, method=method, bits=bits, eval_cfg=ecfg,
            )  # fmt: skip
            row = dataclasses.replace(row, notes={**row.notes, **notes})
            append_results([row], json_path=args.out + ".json", markdown_path=args.out + ".md")
            print(markdown_row(row), end="", flush=True)

    if args.fp:
        evaluate(params, model.hooks, "fp", "W16A16", {"setting": "fp"})
    cfgs = [("w8a8", W8A8Config(level=args.level))] if args.naive else []
    cfgs += [("smoothquant", SmoothQuantConfig(level=args.level, alpha=a)) for a in args.alphas]
    for name, cfg in cfgs:
        t = time.perf_counter()
        q = quantize_from_stats(params, model.cfg, stats, cfg)
        notes = {
            "setting": "W8A8", "bpw": q.bits_per_weight, "bpa": q.bits_per_activation,
            "kv_bits": q.kv_bits, "quant_minutes": calib_min + (time.perf_counter() - t) / 60,
            "calib": note, "config": repr(cfg),
        }  # fmt: skip
        evaluate(q.params, q.hooks, name, f"W8A8 {args.level} ({q.bits_per_weight:.3f} bpw)", notes)


if __name__ == "__main__":
    main()
