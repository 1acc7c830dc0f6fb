"""Weight-only PTQ table on SmolLM2-135M: bits per weight, perplexity and minutes to quantize.

Calibrates on seeded C4 segments, quantizes with each method at each setting, evaluates
WikiText-2 test (and optionally the C4 sample) with the GPTQ protocol, and appends rows to
results/weight_only.{json,md}. Defaults are a REDUCED size (few calibration samples, few
windows) so it runs on a 2-core CPU; `--full` uses the papers' 128 × 2048 calibration and all
windows (hours on a CPU).

    .venv/bin/python scripts/weight_only_table.py --methods rtn gptq --settings W3g64 W2g64
"""

import argparse
import re
import time

from harness.calibration import c4_calibration
from harness.evaluate import EvalConfig
from harness.pipeline import eval_perplexity, load
from harness.results import MARKDOWN_HEADER, append_results, markdown_row
from methods import get_method


def parse_setting(s: str) -> tuple[int, int | None]:
    m = re.fullmatch(r"W(\d)g(\d+|ch)", s)
    if not m:
        raise ValueError(f"setting {s!r} must look like W3g64 or W4gch (per channel)")
    return int(m.group(1)), None if m.group(2) == "ch" else int(m.group(2))


def config_for(method, bits: int, group: int | None):
    cls = method.config
    if hasattr(cls, "for_format"):
        return cls.for_format(bits, group)
    return cls(bits=bits, group_size=group)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--settings", nargs="+", default=["W3g64"])
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--corpora", nargs="+", default=["wikitext2"])
    ap.add_argument("--full", action="store_true", help="128 x 2048 calibration, all windows")
    ap.add_argument("--fp", action="store_true", help="also evaluate the unquantized model")
    ap.add_argument("--out", default="results/weight_only")
    args = ap.parse_args()
    if args.full:
        args.n_calib, args.calib_seqlen, args.seqlen, args.windows = 128, 2048, 2048, None

    model, params, tok = load("smollm2")
    calib = c4_calibration(tok, n_samples=args.n_calib, seqlen=args.calib_seqlen, seed=0)
    ecfg = EvalConfig(progress=False)
    rows = []

    def evaluate(p, method, bits, note):
        for corpus in args.corpora:
            _, row = eval_perplexity(
                model,
                p,
                tok,
                model_name="smollm2",
                corpus=corpus,
                seqlen=args.seqlen,
                limit=args.windows,
                method=method,
                bits=bits,
                eval_cfg=ecfg,
            )
            row.notes.update(note)
            rows.append(row)
            print(markdown_row(row), end="", flush=True)

    print(MARKDOWN_HEADER, end="")
    if args.fp:
        evaluate(params, "fp", "W16A16 (Q4_1 GGUF)", {})
    for setting in args.settings:
        bits, group = parse_setting(setting)
        for name in args.methods:
            m = get_method(name)
            t0 = time.perf_counter()
            q = m.quantize_model(params, model.cfg, calib, config_for(m, bits, group))
            minutes = (time.perf_counter() - t0) / 60
            label = f"W{bits}A16 g{group or 'ch'} ({q.bits_per_weight:.3f} bpw)"
            evaluate(
                q.params,
                name,
                label,
                {
                    "bpw": q.bits_per_weight,
                    "quant_minutes": minutes,
                    "calib": f"{args.n_calib}x{args.calib_seqlen} C4",
                },
            )
    append_results(rows, json_path=args.out + ".json", markdown_path=args.out + ".md")


if __name__ == "__main__":
    main()
