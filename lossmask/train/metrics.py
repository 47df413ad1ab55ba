"""What a run reports: ``OUT/metrics.jsonl``, TensorBoard (when installed), a rich progress bar, ``OUT/loss.png``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricsLog:
    """Appends one JSON object per line; a resumed run first drops lines past the checkpoint it resumes from.

    Only the main process writes; on the others (``enabled`` False) every call does nothing.
    """

    def __init__(self, out_dir: Path, resume_iteration: int | None = None, enabled: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = self._tb = None
        if not enabled:
            return
        kept = []
        if resume_iteration is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip() and json.loads(line).get("iter", 0) <= resume_iteration:
                    kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = _tensorboard(Path(out_dir) / "tensorboard")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "iter" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["iter"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(log_dir))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out_png: Path) -> Path | None:
    """Train and validation loss against iteration (matplotlib Agg); None when nothing was logged."""
    records = read_metrics(metrics_path)
    train = [(r["iter"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["iter"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="val loss")
    ax.set_xlabel("iteration (optimizer window)")
    ax.set_ylabel("weighted cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s  {task.fields[trained]} trained tok"
        ),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )
