"""PNG curves of a training run from its ``metrics.jsonl``: loss (train and validation), learning rate, throughput,
and when the run had an ``[eval]`` section its evaluations (``eval.png``)."""

from __future__ import annotations

from pathlib import Path

from llama.training.metrics import read_metrics

CURVES = {  # file name -> (y label, metrics plotted)
    "loss": ("loss", ("loss", "val_loss")),
    "lr": ("learning rate", ("lr",)),
    "throughput": ("tokens/s", ("tokens_per_s",)),
}
EVAL_GROUPS = {"ppl": "perplexity", "bpb": "bits per byte"}  # y labels; any other group is an lm-eval task


def plot(run_dir: str | Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    written = []
    for name, (ylabel, keys) in CURVES.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            points = series(records, key)
            if points:
                ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / f"{name}.png")
    groups = eval_groups(records)
    if groups:
        fig, axes = plt.subplots(len(groups), 1, figsize=(7, 3 * len(groups)), squeeze=False)
        for ax, (group, keys) in zip(axes[:, 0], groups.items()):
            for key in keys:
                ax.plot(*zip(*series(records, key)), marker="o", label=key.split("/", 2)[2])
            ax.set_title(EVAL_GROUPS.get(group, f"lm-eval {group}"))
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "eval.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "eval.png")
    return written


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]


def eval_groups(records: list[dict]) -> dict[str, list[str]]:
    """The ``[eval]`` series (``eval/GROUP/NAME``) by group, in the order they were first logged: perplexities,
    bits per byte, then one group per lm-eval task."""
    groups: dict[str, list[str]] = {}
    for record in records:
        for key, value in record.items():
            group = key.split("/")[1] if key.startswith("eval/") and key.count("/") >= 2 else None
            if group and isinstance(value, (int, float)) and key not in groups.setdefault(group, []):
                groups[group].append(key)
    return {group: keys for group, keys in groups.items() if keys}
