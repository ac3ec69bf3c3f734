"""What a training run reports as it goes: the step statistics of the current log interval, the
progress line (or tqdm bar), and metrics.jsonl with its plot, loss.png."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import torch

from . import files


class IntervalStats:
    """The step statistics since the last metrics row, summed on the device (no host sync per step).
    Checkpoints keep the running sum, so after a resume mid-interval (a kill, a checkpoint between log
    steps) the next row still covers every step since the previous row."""

    def __init__(self, step: int, state: dict | None = None, device: torch.device | None = None):
        self.reset(step)
        if state and state.get("n") and state.get("sum") is not None:
            self.sum, self.n = state["sum"].to(device), int(state["n"])
            self.first_step = step - self.n + 1

    def reset(self, step: int) -> None:
        self.sum, self.n, self.first_step = None, 0, step + 1
        self.restart_clock(step)

    def restart_clock(self, step: int) -> None:
        """images/s counts the steps this process ran, from now on."""
        self.t0, self.timed_from = time.perf_counter(), step

    def exclude(self, seconds: float) -> None:
        """Leave time spent on something else (an evaluation) out of images/s."""
        self.t0 += seconds

    def add(self, stats: torch.Tensor) -> None:
        self.sum = stats if self.sum is None else self.sum + stats
        self.n += 1

    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    def images_per_s(self, step: int, batch: int) -> float:
        return (step - self.timed_from) * batch / max(time.perf_counter() - self.t0, 1e-9)


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI logs, files, notebooks' pipes)."""

    def __init__(self, start: int, total: int, log, enabled: bool = True):
        self.log, self.total, self.bar = log, total, None
        if enabled and sys.stderr.isatty():  # one bar per job: rank 0's under torchrun
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def report(self, row: dict) -> None:
        line = (f"[{row['step']}/{self.total}] Loss_D: {row['loss_d']:.4f} Loss_G: {row['loss_g']:.4f} "
                f"D(x): {row['d_x']:.4f} D(G(z)): {row['d_g_z1']:.4f} / {row['d_g_z2']:.4f} "
                f"{row['images_per_s']:.0f} img/s")
        if self.bar is not None:
            self.bar.set_postfix_str(line.split("] ", 1)[1], refresh=False)
        else:
            self.log(line)

    def note(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLog:
    """metrics.jsonl, one JSON object per log interval (the losses) and one per evaluation (the sample
    quality: digits_fd, fid, ...; gan_fast.eval); on resume, rows past the checkpoint's step (written
    before a crash) are dropped so the file reads as one continuous run."""

    def __init__(self, path: str, resume_step: int):
        self.path, self.rows = path, []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    with contextlib.suppress(json.JSONDecodeError):
                        row = json.loads(line)
                        if row.get("step", 0) <= resume_step:
                            self.rows.append(row)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)

    def write(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, path: str) -> None:
        """loss.png: the losses, D's outputs and, when the run evaluates, the sample quality."""
        if not self.rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if "loss_d" in r]
        evals = [r for r in self.rows if "digits_fd" in r or "fid" in r]
        fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(16.5 if evals else 11, 4))
        ax_loss, ax_d = axes[:2]
        steps = [r["step"] for r in rows]
        ax_loss.plot(steps, [r["loss_d"] for r in rows], label="Loss_D")
        ax_loss.plot(steps, [r["loss_g"] for r in rows], label="Loss_G")
        ax_loss.set_xlabel("step")
        ax_loss.set_title("losses")
        ax_loss.legend()
        ax_d.plot(steps, [r["d_x"] for r in rows], label="D(x)")
        ax_d.plot(steps, [r["d_g_z1"] for r in rows], label="D(G(z)) before D step")
        ax_d.plot(steps, [r["d_g_z2"] for r in rows], label="D(G(z)) after D step")
        ax_d.set_xlabel("step")
        ax_d.set_ylim(0, 1)
        ax_d.set_title("discriminator outputs")
        ax_d.legend()
        if evals:
            _plot_quality(axes[2], evals)
        fig.tight_layout()
        try:  # redrawn at every milestone: a plot lost to a power cut is redrawn at the next
            files.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), durable=False)
        finally:
            plt.close(fig)


def _plot_quality(ax, evals: list[dict]) -> None:
    """Distances (lower is better) on a log scale; coverage and confidence on a 0..1 twin axis."""
    lines = []
    for key, label in (("digits_fd", "digits FD"), ("fid", "FID")):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            lines += ax.plot(*zip(*points), marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("distance (lower is better)")
    ax.set_title("sample quality")
    points = [r for r in evals if "digits_coverage" in r]
    if points:
        twin = ax.twinx()
        for key, label, style in (("digits_coverage", "class coverage", "--"),
                                  ("digits_confidence", "confidence", ":")):
            lines += twin.plot([r["step"] for r in points], [r[key] for r in points], style,
                               color="gray" if key == "digits_coverage" else "black", label=label)
        twin.set_ylim(0, 1.05)
    ax.legend(lines, [line.get_label() for line in lines], loc="lower left")
