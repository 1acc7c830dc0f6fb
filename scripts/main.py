"""The README's main job: evaluate the default model (SmolLM2-135M) on a WikiText-2 slice.

Prints the result row (GPTQ protocol, seqlen 512, first 8 windows) and appends it to
results/main.json / results/main.md. The full-size evaluation is scripts/evaluate.py.

    .venv/bin/python scripts/main.py [--model smollm2 --seqlen 512 --windows 8]
"""

import argparse
import time

from harness.evaluate import EvalConfig
from harness.pipeline import MODELS, eval_perplexity, load
from harness.results import MARKDOWN_HEADER, append_results, markdown_row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, params, tok = load(args.model)
    _, row = eval_perplexity(
        model,
        params,
        tok,
        model_name=args.model,
        corpus="wikitext2",
        seqlen=args.seqlen,
        limit=args.windows,
        eval_cfg=EvalConfig(progress=False),
    )
    append_results([row], json_path="results/main.json", markdown_path="results/main.md")
    print(f"WikiText-2 test (GPTQ protocol, seqlen {args.seqlen}, first {args.windows} windows):")
    print(MARKDOWN_HEADER + markdown_row(row), end="")
    print(f"({time.perf_counter() - t0:.1f} s in all)")


if __name__ == "__main__":
    main()
