"""The report's plots, drawn by matplotlib as the report draws them: nothing runs off the figure,
and the stage page plots the gradient norm and labels cumulative counts."""

from __future__ import annotations

from pathlib import Path

import yaml

from train.report.build import StageRun, forgetting_figure, stage_plots

STAGES = yaml.safe_load(Path("recipes/pipeline.yaml").read_text())["stages"]


def test_forgetting_plot_keeps_every_stage_name_and_the_axis_title_inside_the_figure(tmp_path):
    assert len(STAGES) == 5
    curve = {"monitor_code_reasoning": (STAGES, [3.1, 2.9, 3.4, 2.8, 2.85]),
             "monitor_text": (STAGES, [3.0, 2.95, 3.2, 2.9, 2.9])}
    fig = forgetting_figure(curve)
    fig.canvas.draw()  # the layout pass, as saving the PNG runs it
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    assert [t.get_text().replace("\n", "_") for t in labels] == STAGES  # wrapped at underscores, all there
    for text in [*labels, ax.xaxis.label, ax.yaxis.label, ax.title]:
        box = text.get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, (text.get_text(), box, fig.bbox)
        assert fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, (text.get_text(), box, fig.bbox)
    # Labels side by side do not overlap.
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))


def test_stage_plots_draw_grad_norm_and_fp8_scales_and_label_cumulative_counts(tmp_path):
    records = [{"stage": "s", "step": step, "loss": 2.0 / step, "lr": 1e-3, "grad_norm": 1.5 / step,
                "tokens": 100 * step, "step_time_s": 0.5, "packing_efficiency": 0.9, "samples": 4,
                "samples_total": 4 * step, "fp8_scale_min": 0.5, "fp8_scale_max": 2.0 + step,
                "samples_by_source": {"a": 3 * step, "b": step}, "tokens_by_source": {"a": 80 * step, "b": 20 * step},
                "skipped": {"too_long": 1}} for step in (1, 2, 3)]
    plots = stage_plots(StageRun("s", tmp_path, records), tmp_path / "report")
    assert plots["Gradient norm"] == "s_grad_norm.png" and (tmp_path / "report" / "s_grad_norm.png").stat().st_size
    assert "FP8 scale range" in plots
    assert {"Samples per source (cumulative)", "Tokens per source (cumulative)",
            "Skipped samples by reason (cumulative)"} <= set(plots)
