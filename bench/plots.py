"""benchmark.py's plots, from the results files: loss_small.png, loss_big.png, speed_memory.png, ablation.png and
loss_time.png (each written when its rows exist)."""
from __future__ import annotations

from pathlib import Path


def plots(results: dict, results_dir: Path) -> None:
    """`results`: each results file's content by name (benchmark, ablations, jobs, scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = {r["name"]: r for r in results["benchmark"]["runs"]}
    for model, names in (("small", ("before_small", "lightweight_small", "peer-trainer_compile")),
                         ("big", ("before_big", "lightweight_big", "reference_qlora", "qlora_py_defaults"))):
        curves = {name: headline[name]["curves"] for name in names if (headline.get(name) or {}).get("curves")}
        if curves:
            save(loss_plot(plt, curves, "train", "eval", "optimizer step", f"{model} model: loss (random init)"),
                 results_dir / f"loss_{model}.png")

    if headline:
        rows = list(headline.values())
        fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 5))
        names = [r["name"] for r in rows]
        speed.barh(names, [r.get("tokens_per_second") or 0 for r in rows], color="tab:blue")
        speed.set(xlabel="tokens/s (steady)")
        memory.barh(names, [r.get("peak_memory_gib") or 0 for r in rows], color="tab:orange")
        memory.set(xlabel="peak GPU memory (GiB)", yticklabels=[])
        save(fig, results_dir / "speed_memory.png")

    ablated = results["ablations"]["runs"]
    if ablated:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5))
        for ax, script in zip(axes, ("lightweight_small", "lightweight_big")):
            rows = [r for r in ablated if r["script"] == script and r.get("ablation") and not r.get("budget_gib")]
            if script in headline:
                rows = [dict(headline[script], ablation="(all on)")] + rows
            ax.barh([r["ablation"] for r in rows], [r.get("tokens_per_second") or 0 for r in rows])
            ax.set(xlabel="tokens/s", title=f"{script}: one technique off")
        save(fig, results_dir / "ablation.png")

    jobs = {r["script"]: r["curves"] for r in results["jobs"]["runs"] if r.get("curves")}
    if jobs:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for ax, pair in zip(axes, (("before_small", "lightweight_small"), ("before_big", "lightweight_big"))):
            loss_plot(plt, {s: jobs[s] for s in pair if s in jobs}, "train_time", "eval_time",
                      "seconds since the process started", " vs ".join(pair), ax=ax)
        save(fig, results_dir / "loss_time.png")


def loss_plot(plt, curves: dict, train: str, evaluation: str, xlabel: str, title: str, ax=None):
    """Each run's train curve, and its eval points in the same colour, on `ax` (a new figure if None)."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        if curve.get(train):
            line, = ax.plot(*zip(*curve[train]), label=f"{name} train")
            if curve.get(evaluation):
                ax.plot(*zip(*curve[evaluation]), "o--", color=line.get_color(), label=f"{name} eval")
    ax.set(xlabel=xlabel, ylabel="loss", title=title)
    if ax.get_lines():
        ax.legend()
    return fig


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
