"""PTQ table (weight-only and weight+activation) on SmolLM2-135M or Gemma-3-270M: bits per
weight and per activation, perplexity, zero-shot accuracy and minutes to quantize.

Calibrates on seeded C4 segments, quantizes with each method at each setting (paper-default
configs, ``methods.compare``), evaluates with the GPTQ protocol, appends every row to
``--out``.{json,md} as soon as it exists, and prints the pivoted table at the end. Defaults are
the REDUCED size the cards quote (16 × 512 calibration tokens, first 16 windows of 512);
``--full`` uses the papers' 128 × 2048 calibration and every window of 2048 (many hours here).

    .venv/bin/python scripts/weight_only_table.py --methods rtn gptq --settings W3g64 W2g64
    .venv/bin/python scripts/weight_only_table.py --methods omniquant --set omniquant.epochs=5
"""

import argparse
import json

from harness.pipeline import load
from harness.results import MARKDOWN_HEADER, append_results, markdown_row
from methods import REGISTRY
from methods.compare import CompareConfig, pivot, run


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """``["omniquant.epochs=5"]`` → ``{"omniquant": {"epochs": 5}}`` (values parsed as JSON)."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, field = key.partition(".")
        if not (sep and dot and method and field):
            raise SystemExit(f"--set {item!r}: expected METHOD.FIELD=VALUE")
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            v = value
        out.setdefault(method, {})[field] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=sorted(REGISTRY))
    ap.add_argument("--settings", nargs="+", default=["W3g64"])
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--corpora", nargs="*", default=["wikitext2"])
    ap.add_argument("--tasks", nargs="*", default=[], help="zero-shot tasks for every row")
    ap.add_argument("--task-limit", type=int, default=200, help="first items of each task")
    ap.add_argument("--seed", type=int, default=0, help="the C4 calibration draw")
    ap.add_argument("--full", action="store_true", help="128 x 2048 calibration, all windows")
    ap.add_argument("--fp", action="store_true", help="also evaluate the unquantized model")
    ap.add_argument("--set", nargs="*", default=[], metavar="METHOD.FIELD=VALUE")
    ap.add_argument("--out", default="results/weight_only")
    args = ap.parse_args()
    if args.full:
        args.n_calib, args.calib_seqlen, args.seqlen, args.windows = 128, 2048, 2048, None
    cmp = CompareConfig(
        n_calib=args.n_calib, calib_seqlen=args.calib_seqlen, seqlen=args.seqlen,
        windows=args.windows, corpora=tuple(args.corpora), seed=args.seed,
        tasks=tuple(args.tasks), task_limit=args.task_limit,
    )  # fmt: skip
    model, params, tok = load(args.model)

    def on_row(row):
        append_results([row], json_path=args.out + ".json", markdown_path=args.out + ".md")
        print(markdown_row(row), end="", flush=True)

    print(MARKDOWN_HEADER, end="")
    rows = run(
        model, params, tok, model_name=args.model, methods=args.methods, settings=args.settings,
        cmp=cmp, fp=args.fp, overrides=parse_overrides(args.set), on_row=on_row,
    )  # fmt: skip
    print("\n" + pivot(rows), end="")


if __name__ == "__main__":
    main()
