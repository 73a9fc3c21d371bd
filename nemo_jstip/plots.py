"""Plots and a side-by-side table of evaluation outputs and training losses, for people rather than scripts.

    python -m nemo_jstip.plots NAME=EVAL_DIR [NAME=EVAL_DIR ...] [--logs NAME=LOG_DIR ...] [--out DIR]

reads each EVAL_DIR/metrics.json (examples/jstip_eval.py) and the train/val losses under each LOG_DIR (TensorBoard
event files as NeMo's exp_manager writes them, else Lightning's ``metrics.csv``), and writes into DIR (default
``compare``) ``entity_accuracy.png`` (per domain and system), ``qa_accuracy.png`` (spoken vs text-input QA, when a
system answered questions), ``loss.png`` (with ``--logs``) and ``compare.md``: the table, with the plots. The grid of
systems (ASR-only / joint / JSTIP) calls ``compare``; the evaluation calls ``write_plots`` for its own report.
Figures are drawn with matplotlib's object API (``Figure.savefig``, the Agg canvas): no pyplot state, no display.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

__all__ = ["pct", "read_scalars", "plot_entity_accuracy", "plot_qa", "plot_losses", "write_plots", "table", "compare"]

LOSSES = ("train_loss", "val_loss")  # what JSTIPModel logs


def read_scalars(log_dir: str | Path, tags=LOSSES) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value)]`` from every event file under ``log_dir`` (a run folder or an exp_dir).

    Folders are read in name order (NeMo names runs by timestamp) and a later value of a step replaces an earlier
    one, so a resumed run continues its curve; point at one run's folder to see only that run.
    """
    root, out = Path(log_dir), {t: {} for t in tags}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        runs = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
    except ImportError:
        runs = []
    for run in runs:
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()  # 0: keep every point
        for t in set(tags) & set(acc.Tags()["scalars"]):
            out[t].update((e.step, e.value) for e in acc.Scalars(t))
    if not runs:  # Lightning's CSVLogger: one row per logging call, empty cells for the other metrics
        for path in sorted(root.rglob("metrics.csv")):
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    for t in tags:
                        if row.get(t):
                            out[t][int(row["step"])] = float(row[t])
    return {t: sorted(v.items()) for t, v in out.items()}


def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def _bars(ax, groups: list[str], series: dict[str, list[float | None]], ylabel: str) -> None:
    """Grouped bars in percent, one colour per series; a missing value leaves a gap, not a zero."""
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [float("nan") if v is None else 100 * v for v in values], width, label=name)
        ax.bar_label(bars, labels=["" if v is None else f"{100 * v:.0f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 105)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: never over a bar


def plot_entity_accuracy(metrics: dict[str, dict], path: str | Path) -> Path | None:
    """Entity accuracy per domain (and overall), one bar per system; None when no system has entity mentions."""
    domains = sorted({d for m in metrics.values() for d, v in m.get("domains", {}).items()
                      if v.get("entity_accuracy") is not None})
    if not domains:
        return None
    series = {name: [m.get("domains", {}).get(d, {}).get("entity_accuracy") for d in domains]
              + [m.get("entity_accuracy")] for name, m in metrics.items()}
    fig, ax = _figure()
    _bars(ax, [*domains, "all"], series, "entity accuracy %")
    ax.set_title("Entity accuracy per domain")
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_qa(metrics: dict[str, dict], path: str | Path) -> Path | None:
    """Zero-shot QA accuracy per system, spoken question next to the same question as text (the upper bound)."""
    names = [n for n, m in metrics.items() if m.get("num_qa")]
    if not names:
        return None
    series = {"spoken question": [metrics[n].get("qa_accuracy") for n in names],
              "question as text (upper bound)": [metrics[n].get("qa_text_accuracy") for n in names]}
    fig, ax = _figure(max(5.0, 1.6 * len(names) + 3))
    _bars(ax, names, series, "QA accuracy %")
    ax.set_title("Zero-shot spoken QA")
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_losses(curves: dict[str, dict[str, list[tuple[int, float]]]], path: str | Path) -> Path | None:
    """Train (solid) and validation (dashed, dots) loss per system against the step; None without any point."""
    if not any(points for c in curves.values() for points in c.values()):
        return None
    fig, ax = _figure()
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i}"
        for tag, style in (("train_loss", dict(ls="-")), ("val_loss", dict(ls="--", marker="o", ms=4))):
            if c.get(tag):
                steps, values = zip(*c[tag])
                ax.plot(steps, values, color=color, label=f"{name} {tag.split('_')[0]}", **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Training loss")
    fig.savefig(path, dpi=120)
    return Path(path)


def write_plots(metrics: dict[str, dict], out_dir: str | Path, curves: dict | None = None) -> dict[str, str]:
    """Every plot that has data, into ``out_dir``: ``{title: file name}`` for Markdown links."""
    out = Path(out_dir)
    made = {
        "Entity accuracy per domain": plot_entity_accuracy(metrics, out / "entity_accuracy.png"),
        "Zero-shot spoken QA": plot_qa(metrics, out / "qa_accuracy.png"),
        "Training loss": plot_losses(curves, out / "loss.png") if curves else None,
    }
    return {title: p.name for title, p in made.items() if p is not None}


def pct(x) -> str:
    """A share in percent with one decimal, ``-`` for None (the tables of this module and of the report)."""
    return "-" if x is None else f"{100 * x:.1f}"


def table(metrics: dict[str, dict]) -> str:
    """One Markdown row per system: WER (all and per domain), entity accuracy (all and per domain), spoken and
    text-input QA accuracy."""
    def domains_with(key):
        return sorted({d for m in metrics.values() for d, v in m.get("domains", {}).items() if v.get(key) is not None})

    wer_domains, entity_domains = domains_with("wer"), domains_with("entity_accuracy")
    head = ["system", "utterances", "WER %", *[f"{d} WER %" for d in wer_domains], "entity acc %",
            *[f"{d} entity acc %" for d in entity_domains], "QA %", "QA text %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in metrics.items():
        per = m.get("domains", {})
        cells = [name, str(m.get("num_utterances", "-")), pct(m.get("wer")),
                 *[pct(per.get(d, {}).get("wer")) for d in wer_domains], pct(m.get("entity_accuracy")),
                 *[pct(per.get(d, {}).get("entity_accuracy")) for d in entity_domains],
                 pct(m.get("qa_accuracy")), pct(m.get("qa_text_accuracy"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(evals: dict[str, str | Path], out_dir: str | Path, logs: dict[str, str | Path] | None = None) -> Path:
    """Table and plots of several evaluation outputs (``name -> eval dir``) and training logs (``name -> log
    dir``) in ``out_dir``; returns the path of ``compare.md``."""
    metrics = {name: json.loads((Path(d) / "metrics.json").read_text()) for name, d in evals.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(metrics, out, {name: read_scalars(d) for name, d in (logs or {}).items()})
    lines = ["# Comparison", "", table(metrics)]
    lines += [f"![{title}]({file})\n" for title, file in plots.items()]
    (out / "compare.md").write_text("\n".join(lines))
    return out / "compare.md"


def _pairs(args: list[str]) -> dict[str, str]:
    """``NAME=DIR`` arguments (a bare DIR is named after its folder), in order."""
    out = {}
    for a in args:
        name, sep, d = a.partition("=")
        out[name if sep else Path(name).name] = d if sep else name
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m nemo_jstip.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("evals", nargs="+", metavar="NAME=EVAL_DIR", help="examples/jstip_eval.py output folders")
    p.add_argument("--logs", nargs="*", default=[], metavar="NAME=LOG_DIR", help="training TensorBoard folders")
    p.add_argument("--out", default="compare", help="output folder (default: compare)")
    args = p.parse_args(argv)
    path = compare(_pairs(args.evals), args.out, _pairs(args.logs))
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
