"""`report.html` for a stage run directory or a pipeline run directory, from what the run wrote
(`metrics.jsonl`, `summary.json`, `config.yaml`, `checkpoints/`): works on a finished or a running
run, and needs no server. Plots are PNGs under `report/` next to the page (relative links, so the
directory can be copied or served as it is).

Stage page: train and held-out loss per source, learning rate, gradient norm, tokens/s and step
time, packing fill and EVS keep ratio, FP8 scale range when used, samples and tokens per source and
skips by reason (cumulative since the stage started), checkpoints. Pipeline page: the forgetting
curve (every monitor source's held-out loss at the end of each stage), train loss across stages,
then one section per stage.
"""

from __future__ import annotations

import html
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from train.checkpoint.files import complete_checkpoints
from train.report.benchmarks import benchmark_table, stage_scores

PLOTS_DIR = "report"
DPI = 90  # 576 px wide plots


@dataclass
class StageRun:
    name: str
    directory: Path
    records: list[dict]  # step records of metrics.jsonl, in order
    summary: dict = field(default_factory=dict)  # {} while the stage runs
    checkpoints: list[str] = field(default_factory=list)
    unreadable_lines: int = 0  # lines of metrics.jsonl that are not a step record (cut writes, garbage)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the records that have a number under `key`."""
        points = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
        return [s for s, _ in points], [v for _, v in points]

    def keys(self, prefix: str) -> list[str]:
        return sorted({k for r in self.records for k in r if k.startswith(prefix)})

    def last(self, key: str):
        return self.summary.get(key) or next((r[key] for r in reversed(self.records) if r.get(key)), None)


def read_metrics_records(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a `metrics.jsonl`, and how many lines could not be read: a kill or a full
    disk during a write leaves a cut last line, which must not block a resume or a report."""
    records, unreadable = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            unreadable += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            unreadable += 1
    return records, unreadable


def read_stage(directory: Path) -> StageRun:
    metrics = directory / "metrics.jsonl"
    records, unreadable = read_metrics_records(metrics) if metrics.exists() else ([], 0)
    if unreadable:
        print(f"warning: {metrics}: skipped {unreadable} unreadable line(s)", file=sys.stderr, flush=True)
    summary_file = directory / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    checkpoints = directory / "checkpoints"
    steps = [p.name for p in complete_checkpoints(checkpoints)]
    name = summary.get("stage") or (records[0]["stage"] if records else directory.name)
    return StageRun(name, directory, records, summary, steps, unreadable)


def stage_dirs(run_dir: Path) -> list[Path]:
    """The stage directories of a pipeline run dir, in the order they ran: as the pipeline's
    summary lists them, else by when each stage started (its config.yaml is written then)."""
    found = {p.name: p for p in run_dir.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists()}
    summary = run_dir / "summary.json"
    order = [s["stage"] for s in json.loads(summary.read_text()).get("stages", [])] if summary.exists() else []
    listed = [found.pop(name) for name in order if name in found]
    rest = sorted(found.values(), key=lambda p: ((p / "config.yaml").stat().st_mtime if (p / "config.yaml").exists()
                                                 else 0.0, p.name))
    return listed + rest


# ---------------------------------------------------------------------------------------------
# plots


def _figure(height: float):
    """A bare matplotlib Figure on the Agg canvas (files only: no pyplot state, no display, no GUI
    toolkit), with fixed margins: matplotlib is imported when a plot is drawn (a third of a second
    every training process would otherwise pay at start-up), and fixed margins save the layout
    pass `tight_layout` would make per plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.14, right=0.97, top=0.88, bottom=0.2)
    return fig, fig.subplots()


def _save(fig, path: Path) -> str:
    fig.savefig(path)
    return path.name


def _wrap_label(name: str, width: int = 16) -> str:
    """A category name (a stage name) broken at underscores into lines of at most about `width`
    characters, so five stage names fit side by side under a 6.4-inch plot."""
    lines: list[str] = []
    for part in name.split("_"):
        if lines and len(lines[-1]) + 1 + len(part) <= width:
            lines[-1] += "_" + part
        else:
            lines.append(part)
    return "\n".join(lines)


def line_figure(title: str, lines: dict[str, tuple[list, list]], ylabel: str, xlabel: str = "step",
                markers: bool = False):
    """The Figure of a line plot (None when no line has a point). Category x values (stage names)
    get wrapped tick labels and a layout pass that fits them: the last one sits at the axes' right
    edge and would run off the figure under the fixed margins."""
    lines = {label: xy for label, xy in lines.items() if xy[0]}
    if not lines:
        return None
    fig, ax = _figure(3.4)
    categories = any(isinstance(v, str) for x, _ in lines.values() for v in x)
    for label, (x, y) in lines.items():
        ax.plot(x, y, marker="o" if markers or len(x) < 3 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if categories:
        names = list(dict.fromkeys(v for x, _ in lines.values() for v in x))  # first-seen order, as plotted
        ax.set_xticks(range(len(names)), [_wrap_label(n) for n in names], fontsize=8)
        ax.margins(x=0.08)
        fig.set_layout_engine("constrained")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=8)
    return fig


def _line_plot(path: Path, title: str, lines: dict[str, tuple[list, list]], ylabel: str, xlabel: str = "step",
               markers: bool = False) -> str | None:
    fig = line_figure(title, lines, ylabel, xlabel, markers)
    return None if fig is None else _save(fig, path)


def _bar_plot(path: Path, title: str, values: dict[str, float], ylabel: str) -> str | None:
    if not values:
        return None
    fig, ax = _figure(3.0)
    ax.bar(list(values), list(values.values()))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    return _save(fig, path)


def shown_val(val: dict, val_sources: int) -> dict:
    """The held-out numbers as the console line and the report show them (keys `val/<source>/loss`
    or `<source>/loss`): the mean over the val sources (`loss`) only when there are several, since
    with one it repeats that source's number. metrics.jsonl and summary.json keep every key."""
    return val if val_sources > 1 else {k: v for k, v in val.items() if k not in ("val/loss", "loss")}


def _val_sources(run: StageRun) -> int:
    return len(_stage_config(run).get("data", {}).get("val_sources") or [])


def _val_label(key: str) -> str:
    source = key.removeprefix("val/").removesuffix("/loss")
    return "held-out, all val sources" if key == "val/loss" else f"held-out {source}"


def stage_plots(run: StageRun, out: Path, prefix: str = "") -> dict[str, str]:
    """{title: png file name in `out`} for one stage."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}{run.name}"
    val_keys = list(shown_val(dict.fromkeys(run.keys("val/")), _val_sources(run)))
    # Tokens of a step from the cumulative count of consecutive records.
    rates = [(record["step"], (record["tokens"] - previous["tokens"]) / record["step_time_s"])
             for previous, record in zip(run.records, run.records[1:])
             if record.get("step_time_s") and record["step"] - previous["step"] == 1]
    plots = {
        "Loss (train and held-out)": _line_plot(
            out / f"{name}_loss.png", f"{run.name}: loss",
            {"train": run.series("loss"), **{_val_label(k): run.series(k) for k in val_keys}}, "loss"),
        "Learning rate": _line_plot(out / f"{name}_lr.png", f"{run.name}: learning rate", {"lr": run.series("lr")}, "lr"),
        "Gradient norm": _line_plot(out / f"{name}_grad_norm.png", f"{run.name}: gradient norm (before clipping)",
                                    {"grad_norm": run.series("grad_norm")}, "L2 norm"),
        "Throughput": _line_plot(out / f"{name}_throughput.png", f"{run.name}: tokens/s",
                                 {"tokens/s": ([s for s, _ in rates], [v for _, v in rates])}, "tokens/s"),
        "Step time": _line_plot(out / f"{name}_step_time.png", f"{run.name}: step time",
                                {"step time": run.series("step_time_s")}, "seconds"),
        "Packing fill and EVS keep ratio": _line_plot(
            out / f"{name}_packing.png", f"{run.name}: packing fill / EVS keep ratio",
            {"packing fill": run.series("packing_efficiency"), "EVS keep ratio": run.series("evs_keep_ratio")}, "ratio"),
        "FP8 scale range": _line_plot(out / f"{name}_fp8.png", f"{run.name}: FP8 scales",
                                      {k: run.series(k) for k in run.keys("fp8_scale")}, "scale"),
        # The loader's tables count from the stage's start (across resumes), not per step.
        "Samples per source (cumulative)": _bar_plot(
            out / f"{name}_samples.png", f"{run.name}: samples per source, cumulative",
            run.last("samples_by_source") or {}, "samples since the stage started"),
        "Tokens per source (cumulative)": _bar_plot(
            out / f"{name}_tokens.png", f"{run.name}: tokens per source, cumulative",
            run.last("tokens_by_source") or {}, "tokens since the stage started"),
        "Skipped samples by reason (cumulative)": _bar_plot(
            out / f"{name}_skipped.png", f"{run.name}: skipped by reason, cumulative",
            run.last("skipped") or {}, "samples since the stage started"),
    }
    return {title: file for title, file in plots.items() if file}


def forgetting_curve(runs: list[StageRun]) -> dict[str, tuple[list[str], list[float]]]:
    """{monitor source: (stage names, held-out loss at each stage's last evaluation)}."""
    curve: dict[str, tuple[list[str], list[float]]] = {}
    for run in runs:
        monitors = {s["name"] for s in _stage_config(run).get("data", {}).get("monitor_sources", [])}
        for key in run.keys("val/"):
            source = key.removeprefix("val/").removesuffix("/loss")
            steps, values = run.series(key)
            if source in monitors and values:
                stages, losses = curve.setdefault(source, ([], []))
                stages.append(run.name)
                losses.append(values[-1])
    return curve


def forgetting_figure(curve: dict[str, tuple[list[str], list[float]]]):
    """The pipeline report's forgetting plot (stage names along x), or None without monitor losses."""
    return line_figure("forgetting monitor (held-out loss at the end of each stage)", dict(curve), "held-out loss",
                       xlabel="stage", markers=True)


def _stage_config(run: StageRun) -> dict:
    import yaml

    path = run.directory / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


# ---------------------------------------------------------------------------------------------
# HTML

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em}section.stage{margin-bottom:2.5em}
.grid{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figcaption{font-size:.85em;color:#555}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
#plots-status{color:#555;font-size:.85em}"""

# Counts the plots the browser actually decoded (non-zero natural width), so a broken image shows.
LOAD_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.plot');
  var ok = Array.prototype.filter.call(imgs, function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var status = document.getElementById('plots-status');
  status.textContent = ok + ' of ' + imgs.length + ' plots loaded';
  status.setAttribute('data-loaded', ok);
  status.setAttribute('data-total', imgs.length);
});
</script>"""


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _figures(plots: dict[str, str], relative: str) -> str:
    return "<div class='grid'>" + "".join(
        f"<figure><img class='plot' src='{html.escape(relative + file)}' alt='{html.escape(title)}'>"
        f"<figcaption>{html.escape(title)}</figcaption></figure>" for title, file in plots.items()) + "</div>"


def _or_na(value) -> object:
    return "n/a" if value is None else value


def _stage_section(run: StageRun, plots: dict[str, str], relative: str) -> str:
    s = run.summary
    status = f"finished: {s['steps']} steps" if s else f"running: step {run.records[-1]['step'] if run.records else 0}"
    final = s.get("final_loss")
    # Cumulative counts since the stage started (a running stage: as of its last logged step).
    facts = [("status", status), ("final train loss", f"{final:.4f}" if isinstance(final, float) else "n/a"),
             ("tokens (cumulative)", _or_na(run.last("tokens"))),
             ("samples (cumulative)", _or_na(run.last("samples_total"))),
             ("epochs (cumulative)", _or_na(run.last("epochs")))]
    val = shown_val(s.get("val") or {k.removeprefix("val/"): v for k, v in (run.records[-1] if run.records else {}).items()
                                      if k.startswith("val/")}, _val_sources(run))
    monitors = {m.get("name") for m in _stage_config(run).get("data", {}).get("monitor_sources") or []}
    facts += [(f"{'forgetting monitor' if k.split('/')[0] in monitors else 'held-out'} {k}",
               f"{v:.4f}" if isinstance(v, float) else v) for k, v in val.items()]
    facts += [(row, f"{value:.4f}") for row, value in stage_scores(s).items()]
    checkpoints = ", ".join(run.checkpoints) or "none yet"
    return (f"<section class='stage' id='{html.escape(run.name)}'><h2>{html.escape(run.name)}</h2>"
            f"{_table(facts + [('checkpoints', checkpoints)])}{_figures(plots, relative)}</section>")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p id='plots-status'>plots loading</p>{body}{LOAD_CHECK}</body></html>")


def _write(path: Path, text: str) -> Path:
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a page
    return path


def write_stage_report(directory: Path) -> tuple[Path, dict[str, Path]]:
    """(report.html, {plot title: png path}) of one stage run directory."""
    run = read_stage(Path(directory))
    out = run.directory / PLOTS_DIR
    plots = stage_plots(run, out)
    page = _write(run.directory / "report.html", _page(f"{run.name} report", _stage_section(run, plots, f"{PLOTS_DIR}/")))
    return page, {title: out / file for title, file in plots.items()}


def _benchmarks_section(runs: list[StageRun]) -> str:
    """The benchmark-by-stage table (rows: benchmark and metric; columns: stages), next to the
    forgetting curve; empty where no stage ran benchmarks."""
    stages, rows = benchmark_table([(run.name, run.summary or {}) for run in runs])
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in ["benchmark", *stages])
    body = "".join("<tr><th>" + html.escape(row) + "</th>" + "".join(
        f"<td>{'' if v is None else f'{v:.4f}'}</td>" for v in values) + "</tr>" for row, values in rows.items())
    return f"<h3>Benchmarks after each stage</h3><table id='benchmarks'><tr>{head}</tr>{body}</table>"


def write_pipeline_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    runs = [read_stage(d) for d in stage_dirs(run_dir)]
    out = run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    curve = forgetting_curve(runs)
    forgetting = forgetting_figure(curve)
    top = {"Forgetting monitor: held-out loss after each stage":
           None if forgetting is None else _save(forgetting, out / "forgetting.png")}
    offset, train = 0, ([], [])
    for run in runs:  # train loss over the whole pipeline, steps laid end to end
        steps, losses = run.series("loss")
        train[0].extend(offset + s for s in steps)
        train[1].extend(losses)
        offset += steps[-1] if steps else 0
    top["Train loss across stages"] = _line_plot(out / "train_loss.png", "train loss across stages",
                                                 {"train": train}, "loss", xlabel="step (stages end to end)")
    top = {title: file for title, file in top.items() if file}
    rows = [(source, ", ".join(f"{stage}: {loss:.4f}" for stage, loss in zip(*points))) for source, points in curve.items()]
    sections = [_stage_section(run, stage_plots(run, run.directory / PLOTS_DIR), f"{run.directory.name}/{PLOTS_DIR}/")
                for run in runs]
    body = (f"<section id='forgetting'><h2>Across stages</h2>{_table(rows) if rows else '<p>no monitor sources</p>'}"
            f"{_benchmarks_section(runs)}{_figures(top, f'{PLOTS_DIR}/')}</section>" + "".join(sections))
    return _write(run_dir / "report.html", _page(f"{run_dir.name} pipeline report", body))


def write_report(run_dir: Path) -> Path:
    """The stage or pipeline report of `run_dir`, whichever it is."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.jsonl").exists():
        return write_stage_report(run_dir)[0]
    if stage_dirs(run_dir):
        return write_pipeline_report(run_dir)
    raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl and no stage directories with one: not a run directory")
