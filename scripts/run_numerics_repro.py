"""Run the numerics reproduction notebooks at full size (LOWBIT_SMALL=0).

    .venv/bin/python scripts/run_numerics_repro.py            # all of them
    .venv/bin/python scripts/run_numerics_repro.py bitmod     # only some (file stems)

Each notebook (a jupytext percent-format .py file in notebooks/) runs as a plain Python
subprocess with the Agg backend; its figures go to notebooks/figures/ and its printed tables
to notebooks/figures/<name>.log. The papers/<name>/README.md cards quote these logs.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = (
    "qlora_datatypes",
    "bipolar_int",
    "bitmod",
    "scaling_laws",
    "fp_vs_int",
    "block_formats",
    "qid_training",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"notebooks to run (default: all of {NOTEBOOKS})")
    args = ap.parse_args()
    unknown = sorted(set(args.names) - set(NOTEBOOKS))
    if unknown:
        ap.error(f"unknown notebook(s) {unknown}; known: {NOTEBOOKS}")
    out_dir = ROOT / "notebooks" / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LOWBIT_SMALL="0", MPLBACKEND="Agg")
    failed = []
    for name in args.names or NOTEBOOKS:
        t0 = time.perf_counter()
        log = out_dir / f"{name}.log"
        with log.open("w") as fh:
            proc = subprocess.run(
                [sys.executable, str(ROOT / "notebooks" / f"{name}.py")],
                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False,
            )  # fmt: skip
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        took = time.perf_counter() - t0
        print(f"{name:16s} {status:18s} {took:7.1f} s  -> {log.relative_to(ROOT)}")
        if proc.returncode:
            failed.append(name)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
