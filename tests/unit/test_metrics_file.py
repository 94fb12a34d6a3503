"""metrics.jsonl survives a cut write: a resume drops the torn line (with a warning), the report
skips unreadable lines and says how many."""

from __future__ import annotations

import json

from train.loop.callbacks import MetricsFile
from train.report.build import read_stage


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_resume_drops_a_torn_last_line_and_keeps_logging(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    records = [{"stage": "s", "step": i, "loss": 1.0 / i} for i in (1, 2, 3)]
    _write(path, records, tail='{"stage": "s", "step": 4, "lo')  # killed mid-write
    metrics = MetricsFile(path, resumed_step=3)
    assert "dropped 1 unreadable line" in capsys.readouterr().err
    assert metrics.last_loss == 1.0 / 3
    metrics.log({"stage": "s", "step": 4, "loss": 0.2})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_report_skips_unreadable_lines_and_counts_them(tmp_path, capsys):
    _write(tmp_path / "metrics.jsonl", [{"stage": "s", "step": 1, "loss": 2.0}],
           tail='garbage\x00\n[1, 2]\n{"stage": "s", "step": 2, "loss": 1.5}\n{"step": 3, "lo')
    stage = read_stage(tmp_path)
    assert [r["step"] for r in stage.records] == [1, 2] and stage.unreadable_lines == 3
    assert "skipped 3 unreadable line(s)" in capsys.readouterr().err
