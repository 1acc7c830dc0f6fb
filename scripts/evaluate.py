"""Evaluate a model at full precision: perplexity and zero-shot accuracy (JSON + markdown).

.venv/bin/python scripts/evaluate.py --model smollm2 --corpus wikitext2 --seqlen 2048
.venv/bin/python scripts/evaluate.py --model gemma3 --corpus ptb c4 --seqlen 512 --limit 16
.venv/bin/python scripts/evaluate.py --model smollm2 --tasks arc_easy piqa --task-limit 200
"""

import argparse
import time

from harness.evaluate import EvalConfig
from harness.pipeline import MODELS, eval_perplexity, eval_zero_shot, load
from harness.results import MARKDOWN_HEADER, append_results, markdown_row
from harness.tasks import TASKS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--corpus", nargs="*", default=["wikitext2"], help="wikitext2 ptb ptb_valid c4")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--protocol", choices=["gptq", "llama.cpp"], default="gptq")
    ap.add_argument("--limit", type=int, default=None, help="first N windows only")
    ap.add_argument("--tasks", nargs="*", default=[], help=" ".join(sorted(TASKS)))
    ap.add_argument("--task-limit", type=int, default=None, help="first N items per task")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--out", default="results/eval", help="results/eval.json and .md")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, params, tok = load(args.model, dtype=args.dtype)
    print(f"loaded {MODELS[args.model][0]} in {time.perf_counter() - t0:.1f} s")
    ecfg = EvalConfig(batch_tokens=args.batch_tokens, progress=not args.no_progress)
    rows = []
    for corpus in args.corpus:
        _, row = eval_perplexity(
            model,
            params,
            tok,
            model_name=args.model,
            corpus=corpus,
            seqlen=args.seqlen,
            limit=args.limit,
            protocol=args.protocol,
            eval_cfg=ecfg,
        )
        rows.append(row)
    for task in args.tasks:
        rows += eval_zero_shot(
            model, params, tok, task, model_name=args.model, limit=args.task_limit, eval_cfg=ecfg
        )[1]
    append_results(rows, json_path=args.out + ".json", markdown_path=args.out + ".md")
    print(MARKDOWN_HEADER + "".join(markdown_row(r) for r in rows), end="")


if __name__ == "__main__":
    main()
