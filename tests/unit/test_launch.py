from __future__ import annotations

import subprocess
import sys

import pytest

from launch.torchrun import render_command


def test_renders_stage_and_pipeline_commands():
    cmd = render_command(2, "stage1_image_sft", ["smoke=cpu"], python="python")
    assert cmd == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "train",
                   "--config-name", "stage1_image_sft", "smoke=cpu"]
    assert render_command(4, None, [], pipeline=True, python="python")[-1] == "train.pipeline"
    with pytest.raises(ValueError):
        render_command(0, "x", [])
    with pytest.raises(ValueError):
        render_command(1, None, [])


def test_dry_run_prints_a_valid_shell_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launch.torchrun", "--nproc-per-node", "2", "--config-name",
                          "stage1_image_sft", "smoke=cpu", "--dry-run"], capture_output=True, text=True, check=True)
    line = out.stdout.strip()
    assert "--nproc-per-node=2" in line and line.endswith("smoke=cpu")
    script = tmp_path / "cmd.sh"
    script.write_text(line + "\n")
    subprocess.run(["bash", "-n", str(script)], check=True)
