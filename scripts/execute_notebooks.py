"""Execute notebooks at full size from their committed rows files and save the executed copies.

Each notebook in ``ROWS`` re-reads its rows (``LOWBIT_SMALL=0`` with ``LOWBIT_ROWS`` set), so
executing it quantizes nothing; whatever else it computes at full size (a decoding demo, a
table) runs for real. The executed copy is written to ``notebooks/executed/<stem>.ipynb`` with
its outputs; figures go to ``notebooks/figures/`` as a full-size run saves them.

    .venv/bin/python scripts/execute_notebooks.py            # every notebook in ROWS
    .venv/bin/python scripts/execute_notebooks.py kivi dgq   # some of them

Cells run one by one in one kernel (nbclient), with the notebook's folder as the working
directory; a failing cell stops that notebook with its error and the script goes on to the next.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
OUT = NOTEBOOKS / "executed"

# notebook stem → the rows file it re-reads at full size (papers/data/)
ROWS = {
    stem: f"{stem}_rows.json"
    for stem in (
        "dgq", "kivi", "llm_int8", "mixllm", "smoothquant", "smoothquant_plus", "weight_only",
        "zeroquant_4p2", "zeroquant_fp", "zeroquant_v2",
        "kvquant", "gear", "wkvquant", "rotatekv", "qserve_kv", "bfp_kv",
    )
}  # fmt: skip


def execute(stem: str, timeout: int) -> bool:
    src = NOTEBOOKS / f"{stem}.py"
    rows = ROOT / "papers" / "data" / ROWS[stem]
    if not src.exists() or not rows.exists():
        print(f"{stem}: skipped ({src.name if not src.exists() else rows.name} missing)")
        return False
    # relative to the notebooks folder, the kernel's working directory (no machine paths)
    os.environ.update(LOWBIT_SMALL="0", LOWBIT_ROWS=f"../papers/data/{rows.name}", MPLBACKEND="Agg")
    nb = jupytext.read(src)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})  # fmt: skip
    t0 = time.perf_counter()
    ok = True
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, i)
            except CellExecutionError as e:
                print(f"{stem}: cell {i} failed:\n{str(e)[-2000:]}", file=sys.stderr)
                ok = False
                break
    for cell in nb.cells:  # the kernel has no ipywidgets: drop tqdm's warning about it
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if "TqdmWarning" not in o.get("text", "")]
    OUT.mkdir(exist_ok=True)
    if ok:
        nbformat.write(nb, OUT / f"{stem}.ipynb")
    print(f"{stem}: {'executed' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stems", nargs="*", default=sorted(ROWS), help="notebooks (file stems)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = ap.parse_args()
    unknown = sorted(set(args.stems) - set(ROWS))
    if unknown:
        raise SystemExit(f"no rows file is known for {unknown}; known: {sorted(ROWS)}")
    results = {s: execute(s, args.timeout) for s in args.stems}
    if not all(results.values()):
        raise SystemExit(f"not executed: {sorted(s for s, ok in results.items() if not ok)}")


if __name__ == "__main__":
    main()
