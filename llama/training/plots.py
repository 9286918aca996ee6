"""PNG curves of a training run from its ``metrics.jsonl``: loss (train and validation), learning rate, throughput."""

from __future__ import annotations

from pathlib import Path

from llama.training.metrics import read_metrics

CURVES = {  # file name -> (y label, metrics plotted)
    "loss": ("loss", ("loss", "val_loss")),
    "lr": ("learning rate", ("lr",)),
    "throughput": ("tokens/s", ("tokens_per_s",)),
}


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
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
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
    return written
