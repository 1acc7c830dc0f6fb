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


# ----------------------------------------------------------------------- W+A variant tables


def variant_rows(variants, *, cmp, rows_from=None, small=True):
    """Rows of ``variants`` — ``{label: (method, setting, overrides)}`` — one evaluation each,
    every row tagged ``notes["variant"] = label``, plus the unquantized ``("fp")`` rows.

    ``rows_from`` (a results JSON written by ``scripts/weight_only_table.py --out``): re-read
    instead of quantizing; a row belongs to a variant when its stored config equals the config
    ``methods.compare.config_for`` builds for that variant (the last such row wins). Otherwise
    SmolLM2 is loaded (``small``: its first 2 blocks only) and each variant is run with
    ``methods.compare.run``."""
    import dataclasses

    from harness.model import Model
    from harness.pipeline import load
    from harness.results import load_results
    from methods import get_method
    from methods.compare import act_bits, config_for, parse_setting, run

    def cfg_repr(method, setting, overrides):
        a = act_bits(setting)
        kw = dict(overrides) | ({} if a is None else {"act_bits": a})
        return repr(config_for(get_method(method), *parse_setting(setting), **kw))

    if rows_from:
        rows = load_results(rows_from)
        if not rows:
            raise FileNotFoundError(f"{rows_from}: no results there")
        want = {cfg_repr(*v): k for k, v in variants.items()}
        out = {}
        for r in rows:
            label = "fp" if r.method == "fp" else want.get(r.notes.get("config"))
            if label is not None:
                out[(label, r.dataset)] = dataclasses.replace(
                    r, notes={**r.notes, "variant": label}
                )
        missing = set(variants) - {k for k, _ in out}
        if missing:
            raise KeyError(f"{rows_from}: no rows for the variant(s) {sorted(missing)}")
        return list(out.values())
    model, params, tok = load("smollm2")
    if small:  # CI: a 2-block model (the embedding, the first 2 blocks and the head)
        model = Model(dataclasses.replace(model.cfg, n_layers=2))
        params = {**params, "blocks": params["blocks"][:2]}
    rows = []
    tag = lambda label: (
        lambda r: rows.append(dataclasses.replace(r, notes={**r.notes, "variant": label}))
    )
    run(model, params, tok, model_name="smollm2", methods=[], settings=[], cmp=cmp, fp=True,
        on_row=tag("fp"))  # fmt: skip
    for label, (method, setting, overrides) in variants.items():
        run(model, params, tok, model_name="smollm2", methods=[method], settings=[setting],
            cmp=cmp, fp=False, overrides={method: dict(overrides)}, on_row=tag(label))  # fmt: skip
    return rows


def variant_table(rows) -> str:
    """Markdown: one line per variant (fp first), bits per weight / activation, ppl per corpus."""
    rows = [r for r in rows if r.metric == "ppl"]
    corpora = list(dict.fromkeys(r.dataset for r in rows))
    lines: dict = {}
    for r in rows:
        line = lines.setdefault(r.notes["variant"], {"bpw": r.notes.get("bpw"),
                                                     "bpa": r.notes.get("bpa")})  # fmt: skip
        line[r.dataset] = r.value
    head = ["variant", "bits/weight", "bits/act", *(f"{c} ppl" for c in corpora)]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, line in sorted(lines.items(), key=lambda kv: kv[0] != "fp"):
        bpw = "16" if line["bpw"] is None else f"{line['bpw']:.3f}"
        bpa = "16" if line["bpa"] is None else f"{line['bpa']:g}"
        ppl = [f"{line[c]:.2f}" if c in line else "" for c in corpora]
        out.append("| " + " | ".join([label, bpw, bpa, *ppl]) + " |")
    return "\n".join(out) + "\n"


def plot_variants(rows, title: str, name: str) -> None:
    """Perplexity of each variant (one bar group per corpus), fp as a dashed line; saved at
    full size as ``notebooks/figures/<name>.png``."""
    rows = [r for r in rows if r.metric == "ppl"]
    corpora = list(dict.fromkeys(r.dataset for r in rows))
    labels = [v for v in dict.fromkeys(r.notes["variant"] for r in rows) if v != "fp"]
    ppl = {(r.notes["variant"], r.dataset): r.value for r in rows}
    fig, axes = plt.subplots(1, len(corpora), figsize=(4.5 * len(corpora), 3.6), squeeze=False)
    for ax, corpus in zip(axes[0], corpora, strict=True):
        ax.bar(range(len(labels)), [ppl.get((v, corpus), float("nan")) for v in labels])
        if ("fp", corpus) in ppl:
            ax.axhline(ppl[("fp", corpus)], ls="--", color="k", lw=1, label="fp")
            ax.legend()
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{corpus}")
        ax.set_ylabel("perplexity")
    fig.suptitle(title)
    savefig(fig, name)
