"""The error table of every number format on Gaussian and heavy-tailed data (issue 2 main job).

.venv/bin/python scripts/format_table.py [--rows 1024 --cols 4096]
"""

import argparse
import time

from numerics.zoo import error_table, markdown, synthetic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    args = ap.parse_args()
    t0 = time.perf_counter()
    shape = (args.rows, args.cols)
    data = {"gaussian": synthetic("gaussian", shape), "t3": synthetic("heavy", shape)}
    print(
        f"Quantization error of every format on {shape} float32 arrays "
        "(N(0,1) and Student-t ν=3); bpw includes scales and zero points.\n"
    )
    print(markdown(error_table(data)))
    print(f"\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
