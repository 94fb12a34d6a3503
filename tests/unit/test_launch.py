from __future__ import annotations

import subprocess
import sys

import pytest

from launch.torchrun import Nodes, render_command


def test_renders_stage_and_pipeline_commands():
    cmd = render_command(2, "stage1_image_sft", ["smoke=cpu"], python="python")
    assert cmd == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "train",
                   "--config-name", "stage1_image_sft", "smoke=cpu"]
    assert render_command(4, None, [], pipeline=True, python="python")[-1] == "train.pipeline"
    with pytest.raises(ValueError):
        render_command(0, "x", [])
    with pytest.raises(ValueError):
        render_command(1, None, [])


def test_renders_multi_node_commands_as_torchrun_users_write_them():
    nodes = Nodes(count=2, rank=1, master_addr="node0", master_port=29400)
    cmd = render_command(8, "stage1_image_sft", [], python="python", nodes=nodes)
    assert cmd[3:8] == ["--nnodes=2", "--node-rank=1", "--master-addr=node0", "--master-port=29400",
                        "--nproc-per-node=8"]
    with pytest.raises(ValueError, match="--master-addr"):
        render_command(8, "stage1_image_sft", [], nodes=Nodes(count=2, rank=0))
    with pytest.raises(ValueError, match="--node-rank=2"):
        render_command(8, "stage1_image_sft", [], nodes=Nodes(count=2, rank=2, master_addr="n0"))


def test_launcher_dry_runs_check_the_config_but_not_cluster_paths(capsys):
    # A cluster-only data path renders on a laptop; a bad override still fails before anything runs.
    from launch import slurm, torchrun

    cluster = ["stage1_image_sft", "data.sources=[{name:mine,path:/cluster/only/shards,weight:1.0}]",
               "data.tokenizer=/cluster/only/tokenizer", "run.dir=/cluster/ckpt/s1"]
    commands = {"torchrun": (torchrun.main, ["--nproc-per-node", "8", "--config-name"]),
                "slurm": (slurm.main, ["nodes=2", "--config-name"])}
    for name, (main, args) in commands.items():
        assert main([*args, *cluster, "--dry-run"]) == 0, name
        assert "/cluster/ckpt/s1" in capsys.readouterr().out
        assert main([*args, *cluster, "optim.lr=-1", "--dry-run"]) == 2, name
        assert "config error: optim.lr=-1.0 must be > 0" in capsys.readouterr().err


def test_dry_run_prints_a_valid_shell_line(tmp_path, capsys):
    from launch import torchrun

    assert torchrun.main(["--nproc-per-node", "2", "--config-name", "stage1_image_sft", "smoke=cpu", "--dry-run"]) == 0
    line = capsys.readouterr().out.strip()
    assert "--nproc-per-node=2" in line and line.endswith("smoke=cpu")
    script = tmp_path / "cmd.sh"
    script.write_text(line + "\n")
    subprocess.run(["bash", "-n", str(script)], check=True)
