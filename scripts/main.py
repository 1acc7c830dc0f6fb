"""The README's main job: GPTQ vs RTN on SmolLM2-135M at reduced size (GPTQ's headline shape).

Loads the default model from its GGUF, draws seeded C4 calibration segments, quantizes every
block linear to 3-bit weights in groups of 128 (the paper's W3 g128; SmolLM2's 576-wide inputs
get a ragged last group of 64) with RTN and with GPTQ (paper defaults: asymmetric, 1% damping,
lazy batches, true-sequential order), evaluates the full-precision model and both
quantized ones on the first WikiText-2 test windows (GPTQ protocol), prints the table and appends
the rows to results/main.{json,md}. The full-size table with every method is
scripts/weight_only_table.py; the cards are papers/gptq and papers/weight_only.

    .venv/bin/python scripts/main.py [--settings W3g128 --n-calib 16 --calib-seqlen 512
                                       --seqlen 512 --windows 16]
"""

import argparse
import time

from harness.pipeline import load
from harness.results import append_results
from methods.compare import CompareConfig, pivot, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["W3g128"])
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    t0 = time.perf_counter()
    cmp = CompareConfig(
        n_calib=args.n_calib, calib_seqlen=args.calib_seqlen, seqlen=args.seqlen,
        windows=args.windows,
    )  # fmt: skip
    model, params, tok = load("smollm2")

    def on_row(row):
        append_results([row], json_path="results/main.json", markdown_path="results/main.md")
        print(f"  {row.method:5s} {row.bits:28s} ppl {row.value:8.2f}", flush=True)

    print(
        f"SmolLM2-135M, WikiText-2 test (GPTQ protocol, first {args.windows} windows of "
        f"{args.seqlen}); calibration {args.n_calib} x {args.calib_seqlen} C4 tokens"
    )
    rows = run(
        model, params, tok, model_name="smollm2", methods=["rtn", "gptq"],
        settings=args.settings, cmp=cmp, on_row=on_row,
    )  # fmt: skip
    print("\n" + pivot(rows), end="")
    print(f"({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
