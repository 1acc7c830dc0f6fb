"""Train one tiny LLaMA-style model (resuming if interrupted) and measure its QiD per checkpoint.

    .venv/bin/python scripts/train_tiny.py --out results/qid/d64L2 \\
        --d-model 64 --n-layers 2 --n-heads 2 --d-ff 192 --steps 800
    .venv/bin/python scripts/train_tiny.py --out results/qid/d64L2 ... --eval --json qid.json

On the shared 2-core machine pin it to one core:
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c 1 ...

Corpus: C4 sample + Python stdlib source, SmolLM2 tokenizer remapped to the most frequent
--vocab ids (harness.train). Checkpoints: <out>/state (resume) and <out>/budgets (params at
the --budget-fracs of the run). --eval: validation loss of every kept checkpoint in float and
after RTN of every block linear (asymmetric INT, groups of --group-size along the input,
fp16 scales) at each of --bits; ΔqLoss = loss_quant − loss_float (arXiv 2411.17691).
The notebook notebooks/qid_training.py runs the whole grid.
"""

import argparse
import json
import time
from pathlib import Path

from harness import train as T
from numerics.config import rtn


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="checkpoint directory of this run")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--n-heads", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=192)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--sources", default="c4,stdlib", help="comma list of c4, stdlib")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--budget-fracs", default="0.0625,0.125,0.25,0.5,0.75,1")
    ap.add_argument("--eval", action="store_true", help="measure ΔqLoss of every checkpoint")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--val-windows", type=int, default=128)
    ap.add_argument("--json", default=None, help="write the measured rows here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    corpus_cfg = T.CorpusConfig(sources=tuple(args.sources.split(",")), vocab_size=args.vocab)
    t0 = time.perf_counter()
    corpus = T.build_corpus(corpus_cfg, cache_dir="results/qid/cache")
    print(f"corpus: {corpus.train.size} train / {corpus.val.size} val tokens, "
          f"<unk> {corpus.unk_rate}, {time.perf_counter() - t0:.1f} s")  # fmt: skip
    fracs = [float(f) for f in args.budget_fracs.split(",")]
    cfg = T.TrainConfig(
        d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, d_ff=args.d_ff,
        vocab_size=args.vocab, seq_len=args.seq_len, batch_size=args.batch_size,
        steps=args.steps, warmup_steps=max(1, round(args.warmup_frac * args.steps)),
        peak_lr=args.lr, seed=args.seed, save_every=args.save_every,
        budgets=T.budget_schedule(args.steps, fracs),
    )  # fmt: skip
    print(f"N = {T.non_embedding_params(cfg)} non-embedding params, "
          f"{cfg.steps * cfg.tokens_per_step} tokens, budgets at steps {cfg.budgets}")  # fmt: skip
    t0 = time.perf_counter()
    res = T.train(cfg, corpus, args.out, progress=not args.no_progress)
    print(f"trained to step {res.step} (resumed from {res.resumed_from}) in "
          f"{time.perf_counter() - t0:.1f} s; last loss {res.history[-1][1]:.3f}")  # fmt: skip
    if not args.eval:
        return
    quant = {b: rtn(b, group_size=args.group_size, sym=False, scale_dtype="float16")
             for b in _ints(args.bits)}  # fmt: skip
    windows = T.val_windows(corpus.val, cfg.seq_len, args.val_windows)
    rows = T.measure_qid(cfg, args.out, windows, quant)
    print("| step | D | P | loss float | loss quant | ΔqLoss |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['D']} | {r['P']} | {r['loss_float']:.4f} | "
              f"{r['loss_quant']:.4f} | {r['dloss']:.4f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
