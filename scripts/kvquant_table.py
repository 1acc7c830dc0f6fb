"""KVQuant's table: full precision, KIVI and KVQuant at each setting (``--settings``), then
the ablation (arXiv 2401.18079 App. H–K) — KVQuant at ``--ablate-setting`` with one piece
turned off at a time — all in one process, so the calibration pass (activations and Fisher) is
computed once and shared. Every row is appended to ``--out``.{json,md} as it comes. An
ablation row's method is ``kvquant-<piece>`` (``-pre_rope``: keys quantized after RoPE;
``-outliers``: no dense-and-sparse; ``-sink``: the first token quantized too; ``-nuq``:
uniform levels), its config in the row's notes.

    .venv/bin/python scripts/kvquant_table.py --corpora wikitext2 c4 \
        --out papers/data/kvquant_rows
    .venv/bin/python scripts/kvquant_table.py --settings KV3 --methods kvquant --ablate \
        --seqlen 2048 --windows 4 --corpora wikitext2 c4 --out papers/data/kvquant_2048_rows
"""

import argparse
import dataclasses

from harness.pipeline import load
from harness.results import MARKDOWN_HEADER, append_results, markdown_row
from methods.compare import CompareConfig, pivot, run

ABLATIONS = {  # pre_rope last: it alone needs a second calibration pass (post-RoPE keys)
    "outliers": {"outliers": 0.0},
    "sink": {"sink": 0},
    "nuq": {"nuq": False},
    "pre_rope": {"pre_rope": False},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=["kivi", "kvquant"])
    ap.add_argument("--settings", nargs="*", default=["KV4", "KV3", "KV2"])
    ap.add_argument("--no-fp", action="store_true", help="skip the full-precision rows")
    ap.add_argument("--ablate-setting", default="KV3")
    ap.add_argument("--ablate", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--corpora", nargs="*", default=["wikitext2"])
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default="results/kvquant_table")
    args = ap.parse_args()
    cmp = CompareConfig(
        n_calib=args.n_calib, calib_seqlen=args.calib_seqlen, seqlen=args.seqlen,
        windows=args.windows, corpora=tuple(args.corpora),
    )  # fmt: skip
    model, params, tok = load(args.model)
    print(MARKDOWN_HEADER, end="")
    rows = []

    def keep(row, method=None):
        row = row if method is None else dataclasses.replace(row, method=method)
        rows.append(row)
        append_results([row], json_path=args.out + ".json", markdown_path=args.out + ".md")
        print(markdown_row(row), end="", flush=True)

    run(
        model, params, tok, model_name=args.model, methods=args.methods,
        settings=args.settings, cmp=cmp, fp=not args.no_fp, on_row=keep,
    )  # fmt: skip
    for piece in args.ablate:
        run(
            model, params, tok, model_name=args.model, methods=["kvquant"],
            settings=[args.ablate_setting], cmp=cmp, fp=False,
            overrides={"kvquant": ABLATIONS[piece]},
            on_row=lambda r, piece=piece: keep(r, f"kvquant-{piece}"),
        )  # fmt: skip
    print("\n" + pivot(rows), end="")


if __name__ == "__main__":
    main()
