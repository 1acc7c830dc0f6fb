"""LLM.int8()'s outlier feature dimensions per linear (arXiv 2208.07339 sec. 3.2 / 4).

Calibrates on the same seeded C4 segments as the tables (16 × 512 by default), runs
``methods.llm_int8`` and writes, per block linear, the fraction of its input features with
``max|X_j| ≥ α`` over those segments — the share of the features the mixed-precision
decomposition would multiply in float if all segments were one forward pass (per sequence it is
at most that).

    .venv/bin/python scripts/llm_int8_outliers.py --model smollm2 \
        --out papers/data/llm_int8_outliers.json
"""

import argparse
import json
from pathlib import Path

from harness.calibration import c4_calibration
from harness.pipeline import load
from methods.base import get_method
from methods.llm_int8 import LLMInt8Config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--threshold", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/llm_int8_outliers.json")
    args = ap.parse_args()
    model, params, tok = load(args.model)
    calib = c4_calibration(tok, n_samples=args.n_calib, seqlen=args.calib_seqlen, seed=args.seed)
    cfg = LLMInt8Config(threshold=args.threshold)
    q = get_method("llm_int8").quantize_model(params, model.cfg, calib, cfg, outliers=True)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[args.model] = {
        "threshold": args.threshold,
        "calib": f"{args.n_calib}x{args.calib_seqlen} C4 (seed {args.seed})",
        "layers": [{"name": r["name"], "outlier_frac": r["outlier_frac"]} for r in q.report],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(out)
    mean = sum(r["outlier_frac"] for r in q.report) / len(q.report)
    print(f"{args.model}: mean outlier fraction {mean:.4f} over {len(q.report)} linears")


if __name__ == "__main__":
    main()
