"""Training records: the JSONL metrics log, the loss and evaluation curves (PNG) and TensorBoard event files.

(Preview pictures are written by pipelines/sample/outputs.py, like every picture for people.)"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from pipelines.files import atomic_write_bytes, atomic_write_text


class MetricsLog:
    """`RUN/metrics.jsonl`: one JSON object per logged step. Reopening after a resume drops steps past it."""

    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics log; a line cut by a crash is ignored."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_loss(metrics_path: str | Path, png_path: str | Path) -> None:
    """Loss against step (raw and smoothed), log scale, written with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        return
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, lw=0.8, alpha=0.4, label="loss")
    window = max(1, len(loss) // 20)
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    if np.all(loss[np.isfinite(loss)] > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, png_path)


def _save_figure(fig, png_path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())


EVAL_LABELS = {
    "clip_score": "CLIP score",
    "temporal_consistency": "temporal consistency",
    "fid": "FID",
}


EVAL_SUMMARY_KEYS = ("samples", "size", "seconds")  # what an eval record holds besides metric values


def metric_values(record: dict) -> dict[str, float]:
    """The metric values of an eval record (what is plotted and sent to TensorBoard)."""
    return {k: float(v) for k, v in record.items() if k not in EVAL_SUMMARY_KEYS and isinstance(v, (int, float))}


def eval_records(metrics_path: str | Path) -> list[tuple[int, dict]]:
    """(step, eval record) of every evaluation line of a metrics log (`gentron train --eval-every`)."""
    return [
        (r["step"], r["eval"]) for r in read_metrics(metrics_path) if isinstance(r.get("eval"), dict) and "step" in r
    ]


def plot_eval(metrics_path: str | Path, png_path: str | Path) -> bool:
    """The evaluation metrics against step, one panel each (beside loss.png); False when there is none yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [(step, metric_values(e)) for step, e in eval_records(metrics_path)]
    names = list(dict.fromkeys(k for _, values in records for k in values))
    if not names:
        return False
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), dpi=100, squeeze=False)
    for ax, name in zip(axes.flat, names):
        points = [(step, values[name]) for step, values in records if name in values]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, lw=1.2)
        label = EVAL_LABELS.get(name, name.replace("probe_", "toy probe: "))
        ax.set_title(label, fontsize=10)
        if name.startswith("probe_"):
            ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    _save_figure(fig, png_path)
    return True


class TensorBoardLog:
    """`--log-to tensorboard`: scalars and images as event files in RUN/tensorboard (rank 0; works offline).

    A resumed run purges the events past its checkpoint (SummaryWriter's purge_step), so the curves of a killed
    and resumed run read as one run."""

    def __init__(self, folder: str | Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder), purge_step=resume_step + 1 if resume_step else None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Markdown text (the bucket table) in TensorBoard's text tab."""
        self.writer.add_text(tag, text, step)

    def image(self, tag: str, path: str | Path, step: int) -> None:
        """A PNG file (a preview grid or film strip) as an image event."""
        from PIL import Image

        with Image.open(path) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
