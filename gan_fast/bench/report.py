"""What a benchmark run records and shows: device, versions and git metadata, the JSON result, the
table and the plot."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import subprocess

import torch

from .. import __version__
from ..files import write_atomic
from .cases import PROVIDERS

# the checkout gan_fast runs from: gan_fast/bench/report.py -> the folder above gan_fast/
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "cpu": cpu_name(), "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, slug=_slug(props.name), memory_bytes=props.total_memory,
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
    else:
        info.update(name=info["cpu"], slug="cpu-" + _slug(info["cpu"]))
    return info


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "gan_fast": __version__,
         "cuda": torch.version.cuda, "cudnn": None, "triton": None}
    with contextlib.suppress(Exception):
        v["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    with contextlib.suppress(Exception):
        import triton

        v["triton"] = triton.__version__
    return v


def git_info() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or None
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))
            if commit else None}


def default_out(info: dict, quick: bool, date: datetime.datetime) -> str:
    """bench/results/<device-slug>-<date>[-quick][-N].json, in the checkout gan_fast runs from (else
    under the current directory)."""
    base = CHECKOUT if os.path.isdir(os.path.join(CHECKOUT, "bench")) else os.getcwd()
    root = os.path.relpath(os.path.join(base, "bench", "results"))
    stem = f"{info['slug']}-{date:%Y-%m-%d}" + ("-quick" if quick else "")
    path = os.path.join(root, stem + ".json")
    n = 2
    while os.path.exists(path):
        path = os.path.join(root, f"{stem}-{n}.json")
        n += 1
    return path


def write_json(doc: dict, path: str) -> None:
    # not durable (no fsync): rewritten after every result, and the rename alone keeps it whole
    write_atomic(path, lambda f: f.write(json.dumps(doc, indent=1) + "\n"), text=True, durable=False)


# ---------------------------------------------------------------------------------------- table

# After case and provider, the table's columns: (header, the result's key or a function of it, format).
COLUMNS = (("ms", lambda r: r["median_s"] * 1e3, ".3f"), ("img/s", "images_per_s", ",.0f"),
           ("TFLOP/s", "tflops", ".3f"), ("% peak", "pct_peak", ".1f"),
           ("% fp32 peak", "pct_peak_fp32", ".1f"), ("% bf16 peak", "pct_peak_bf16", ".1f"),
           ("x tutorial", "speedup_vs_tutorial", ".2f"), ("x eager-best", "speedup_vs_eager_best", ".2f"),
           ("x eager", "speedup_vs_eager", ".2f"), ("x best compile", "speedup_vs_best_compile", ".2f"),
           ("mem MiB", lambda r: r["memory_bytes"] / 2 ** 20 if r.get("memory_bytes") is not None else None,
            ",.0f"),
           ("compile s", "compile_s", ".1f"), ("1st step s", "time_to_first_step_s", ".2f"))


def _cell(r: dict, value, spec: str) -> str:
    v = r.get(value) if isinstance(value, str) else value(r)
    return "-" if v is None else format(v, spec)


def format_table(doc: dict) -> str:
    """The result table of a benchmark document (one row per case and provider that ran)."""
    rows, notes = [], {}
    for r in doc["results"]:
        if r.get("status") != "ok":
            key = (r["status"], r["provider"], r.get("reason", ""))
            notes.setdefault(key, []).append(r["case"])
            continue
        provider = r["provider"] + (f" [{r['variant']}]" if r.get("variant") else "")
        rows.append([r["case"], provider + (" (!)" if r.get("warning") else ""),
                     *(_cell(r, value, spec) for _, value, spec in COLUMNS)])
    header = ["case", "provider", *(h for h, _, _ in COLUMNS)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = []
    dev, ver = doc["device"], doc["versions"]
    peaks = ", ".join(f"{k} {v:.2f}" for k, v in doc.get("peaks_tflops", {}).items())
    lines.append(f"device: {dev['name']} ({dev['type']}; CPU threads: {dev['cpu_threads']}); torch "
                 f"{ver['torch']}, triton {ver['triton']}, CUDA {ver['cuda']}; commit "
                 f"{(doc['git']['commit'] or '?')[:10]}{' (dirty)' if doc['git'].get('dirty') else ''}; "
                 f"{doc['date']}")
    lines.append(f"measured matmul peak, TFLOP/s: {peaks or '-'}")
    sep = "  "
    lines.append(sep.join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    lines.append(sep.join("-" * w for w in widths))
    last_case = None
    for row in rows:
        shown = list(row)
        if row[0] == last_case:
            shown[0] = ""
        last_case = row[0]
        lines.append(sep.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(shown, widths))))
    lines.append("")
    lines.append("ms: median time per call; % peak: of the matmul peak above in the case's precision, "
                 "% fp32 / bf16 peak: of the fp32 / bf16 one; x tutorial / x eager-best / x eager / x "
                 "best compile: speedup over pytorch/examples' DCGAN step, over the fastest eager variant "
                 "[shown beside eager-best], over the reference and over the fastest torch.compile mode "
                 "of the same case; mem: " +
                 ("torch.cuda.max_memory_allocated" if dev["type"] == "cuda" else "peak RSS growth") +
                 "; compile s: warm-up time beyond steady-state calls; 1st step s: build + first call.")
    for r in doc["results"]:
        if r.get("warning"):
            lines.append(f"(!) {r['case']} {r['provider']}: {r['warning']}")
    for (status, provider, reason), cases in notes.items():
        where = "all cases" if len(cases) == len({r['case'] for r in doc['results']}) else (
            f"{len(cases)} case(s)" if len(cases) > 2 else ", ".join(cases))
        lines.append(f"{status}: {provider} ({where}): {reason}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- plot

def plot(doc: dict, path: str) -> None:
    """images/s per provider per case, one panel for the whole steps and one for the ops; a log scale
    where a panel's values span more than 20x, each bar labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["results"] if r.get("status") == "ok"]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in ok)]
    panels = [(kind, list(dict.fromkeys(r["case"] for r in ok if r["kind"] == kind)))
              for kind in ("step", "op")]
    panels = [(k, cs) for k, cs in panels if cs]
    if not panels:
        raise ValueError("the result holds no successful measurement to plot")
    value = {(r["case"], r["provider"]): r["images_per_s"] for r in ok}
    heights = [0.9 + sum(0.16 * max(1, sum((c, p) in value for p in providers)) + 0.12 for c in cs)
               for _, cs in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (kind, cases) in zip(axes[:, 0], panels):
        n = max(1, len(providers))
        bar = 0.8 / n
        values = [v for (c, _), v in value.items() if c in cases]
        log = max(values) / max(min(values), 1e-9) > 20
        for j, p in enumerate(providers):
            ys = [i + (j - (n - 1) / 2) * bar for i in range(len(cases))]
            xs = [value.get((c, p), 0.0) for c in cases]
            ax.barh(ys, xs, height=bar, color=colors(j % 10), label=p)
            for y, x in zip(ys, xs):
                if x > 0:
                    ax.text(x, y, f" {x:,.0f}", va="center", fontsize=6)
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels([c.split("/", 1)[1] for c in cases], fontsize=7 if kind == "op" else 9)
        ax.invert_yaxis()
        if log:
            ax.set_xscale("log")
        ax.set_xlim(right=max(values) * (3 if log else 1.15))
        ax.set_xlabel(f"images/s ({'log scale, ' if log else ''}higher is better)")
        ax.set_title("whole training step (Trainer.train_step)" if kind == "step"
                     else "fused ops, forward + backward")
        ax.grid(axis="x", which="major", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    dev = doc["device"]
    fig.suptitle(f"gan_fast benchmarks: {dev['name']}, torch {doc['versions']['torch']}, "
                 f"{doc['date'][:10]}" + (" (--quick: not a measurement)" if doc.get("quick") else ""),
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
