"""What every notebook shares: the size switch, the figure folder, and saving a figure.

``LOWBIT_SMALL=1`` (the default; CI's setting) runs a notebook at its small size and writes no
figures; ``LOWBIT_SMALL=0`` (``scripts/run_numerics_repro.py`` and friends) runs it at full size
and saves its figures under ``notebooks/figures/``. Notebooks import this as ``_common``: their
own folder is on ``sys.path`` when run as a script or in Jupyter (``tests/test_notebooks.py``
puts it there for in-process runs).
"""

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SMALL = os.environ.get("LOWBIT_SMALL", "1") == "1"
ROOT = Path(__file__).resolve().parents[1]
FIG_DIR = ROOT / "notebooks" / "figures"


def savefig(fig, name: str) -> None:
    """Save ``fig`` as ``notebooks/figures/<name>.png`` at full size only; always close it."""
    if not SMALL:
        FIG_DIR.mkdir(parents=True, exist_ok=True)
        fig.savefig(FIG_DIR / f"{name}.png", dpi=130, bbox_inches="tight")
    plt.close(fig)


def linear_weights(params, cfg, layers=None, kinds=None) -> dict:
    """SmolLM2-style block linears as float32 arrays by full name (``blocks.3.mlp.up_proj``):
    blocks ``layers`` (None: all), linears ``kinds`` (e.g. ``("q_proj", "down_proj")``; None:
    all seven)."""
    import jax.numpy as jnp

    from harness.model import get_param, linear_names

    return {
        n: jnp.asarray(get_param(params, n), jnp.float32)
        for n in linear_names(cfg)
        if (layers is None or int(n.split(".")[1]) in layers)
        and (kinds is None or n.split(".")[-1] in kinds)
    }
