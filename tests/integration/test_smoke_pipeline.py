"""The main job end to end: `python -m train.pipeline smoke=cpu` over all five stages."""

from __future__ import annotations

import json

import pytest

from tests.integration.helpers import load_stage_model, read_metrics, run_module, same, state_of

STAGES = ["stage0_projector_warmup", "stage1_image_sft", "stage2_video_sft", "stage3_text_recovery",
          "stage4_long_context"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("pipeline")
    result = run_module(["train.pipeline", "smoke=cpu", "run.dir=runs/smoke"], cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd, cwd / "runs" / "smoke", result


def test_every_stage_leaves_the_run_directory_contract(pipeline_run):
    _, root, _ = pipeline_run
    for stage in STAGES:
        run_dir = root / stage
        summary = json.loads((run_dir / "summary.json").read_text())
        assert set(summary) >= {"stage", "steps", "final_loss", "tokens", "epochs", "skipped", "checkpoint"}
        assert summary["stage"] == stage and summary["steps"] == 24 and summary["skipped"] == {}
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        assert (run_dir / "checkpoints" / latest / "COMPLETE").exists()
        assert (run_dir / "config.yaml").exists()
        metrics = read_metrics(run_dir)
        assert [m["step"] for m in metrics] == list(range(1, 25))
        for key in ("stage", "step", "loss", "lr", "tokens", "grad_norm", "step_time_s", "packing_efficiency"):
            assert key in metrics[0]


@pytest.mark.parametrize("stage", STAGES)
def test_loss_falls_in_every_stage(pipeline_run, stage):
    _, root, _ = pipeline_run
    losses = [m["loss"] for m in read_metrics(root / stage)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def embedded_lm_checkpoint(root):
    """What the smoke Stage 0 started from: the LM pre-trained on the embedded data, named in its config."""
    from pathlib import Path

    import yaml

    from train.checkpoint.store import find_latest

    given = yaml.safe_load((root / STAGES[0] / "config.yaml").read_text())["init"]["from_checkpoint"]
    assert Path(given).parent.name == "lm" and Path(given).parent.parent.name == "synth_data", given
    return find_latest(Path(given) / "checkpoints")


def test_stage0_projector_warmup_learns_into_a_pretrained_lm(pipeline_run):
    """The smoke Stage 0 starts from a language model pre-trained on the scenes written as text, so the
    projector has a reader: the loss falls (a random frozen LM sat at ln(vocab) = 6.93 throughout)."""
    _, root, _ = pipeline_run
    losses = [m["loss"] for m in read_metrics(root / STAGES[0])]
    assert max(losses) < 2.0  # far below ln(1024): the LM was trained before the stage
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, (first, last)


def test_stage0_trains_only_the_projector(pipeline_run):
    cwd, root, _ = pipeline_run
    initial = load_stage_model(root / STAGES[0], checkpoint=embedded_lm_checkpoint(root))  # what stage 0 started from
    final = load_stage_model(root / STAGES[0])
    assert same(state_of(initial.language_model), state_of(final.language_model))
    assert same(state_of(initial.vision_model), state_of(final.vision_model))
    assert not same(state_of(initial.projector), state_of(final.projector))


def test_stage3_leaves_vision_and_projector_as_stage2_left_them(pipeline_run):
    _, root, _ = pipeline_run
    stage2 = load_stage_model(root / STAGES[2])
    stage3 = load_stage_model(root / STAGES[3])
    assert same(state_of(stage2.vision_model), state_of(stage3.vision_model))
    assert same(state_of(stage2.projector), state_of(stage3.projector))
    assert not same(state_of(stage2.language_model), state_of(stage3.language_model))


def test_stage1_starts_from_stage0_weights(pipeline_run):
    _, root, _ = pipeline_run
    config = (root / STAGES[1] / "config.yaml").read_text()
    assert "stage0_projector_warmup/checkpoints/step_0000024" in config


def test_rerun_skips_finished_stages(pipeline_run):
    cwd, root, _ = pipeline_run
    before = (root / STAGES[4] / "metrics.jsonl").read_text()
    result = run_module(["train.pipeline", "smoke=cpu", "run.dir=runs/smoke"], cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("already finished") == 5
    assert (root / STAGES[4] / "metrics.jsonl").read_text() == before


def test_public_api_loads_the_final_language_model(pipeline_run):
    import torch

    from train.api import load_language_model

    _, root, _ = pipeline_run
    lm = load_language_model(root / STAGES[4])
    assert not lm.training
    ids = torch.randint(12, 500, (1, 40))
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    with torch.no_grad():
        packed = lm(ids, cu_seqlens=cu)
        first, second = lm(ids[:, :15]), lm(ids[:, 15:])
    assert packed.shape == (1, 40, lm.cfg.vocab_size)
    assert torch.allclose(packed, torch.cat([first, second], dim=1), rtol=1e-5, atol=1e-5)


def test_pipeline_ends_with_a_forgetting_curve_and_a_report(pipeline_run):
    """The shared monitor source (held-out shards apart from the val sources') is evaluated at the
    end of every stage; the pipeline's summary holds that curve, and report.html is written and its
    path printed."""
    _, root, result = pipeline_run
    summary = json.loads((root / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == STAGES
    curve = summary["forgetting"]["monitor_code_reasoning"]
    assert [p["stage"] for p in curve] == STAGES
    for point, stage in zip(curve, STAGES):
        assert point["loss"] == read_metrics(root / stage)[-1]["val/monitor_code_reasoning/loss"]
    assert "=== report: runs/smoke/report.html" in result.stdout
    page = (root / "report.html").read_text()
    assert all(f"id='{stage}'" in page for stage in STAGES) and "forgetting.png" in page
    assert all((root / stage / "report.html").exists() for stage in STAGES)


def test_every_stage_shows_each_held_out_number_once(pipeline_run):
    """The monitor reads shards of its own, and `val/loss` is shown only over several val sources:
    each stage's val line and its report table hold no number twice, the monitor's among them."""
    import re

    _, root, result = pipeline_run
    for stage in STAGES:
        lines = [line for line in result.stdout.splitlines() if line.startswith(f"[{stage}] val ")]
        assert lines, result.stdout[-3000:]
        shown = dict(re.findall(r"(\S+) (\d+\.\d+)", lines[-1].removeprefix(f"[{stage}] val ")))
        assert "monitor_code_reasoning/loss" in shown
        assert len(set(shown.values())) == len(shown), (stage, shown)
        page = (root / stage / "report.html").read_text()
        table = dict(re.findall(r"<th>((?:held-out|forgetting monitor) [^<]+)</th><td>([\d.]+)</td>", page))
        assert "forgetting monitor monitor_code_reasoning/loss" in table
        assert len(set(table.values())) == len(table) == len(shown), (stage, table)
    assert "no forgetting monitor" not in result.stdout


def test_smoke_monitor_reads_no_val_source_and_real_recipes_say_it_is_unset():
    from train.config.compose import load_config
    from train.loop.pipeline import forgetting_monitor_notice

    smoke = [load_config(stage, ["smoke=cpu"]) for stage in STAGES]
    for cfg in smoke:
        monitors = {s.path for s in cfg.data.monitor_sources}
        assert monitors and not monitors & {s.path for s in cfg.data.val_sources}, cfg.stage
    assert forgetting_monitor_notice(smoke) is None
    real = [load_config(stage, check_paths=False) for stage in STAGES]
    assert all(cfg.data.monitor_sources == [] for cfg in real)
    notice = forgetting_monitor_notice(real)
    assert notice.startswith("=== no forgetting monitor") and "data.monitor_sources=[{name:" in notice


def find_chromium() -> str | None:
    import shutil

    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


def test_report_renders_in_a_browser_with_every_plot(pipeline_run, tmp_path):
    """Headless Chromium loads report.html from disk: every plot image decodes (natural width > 0,
    counted by the page itself) and there is one section per stage."""
    import re
    import subprocess

    browser = find_chromium()
    if browser is None:
        pytest.skip("chromium is not installed (make setup installs it as root with apt-get)")
    _, root, _ = pipeline_run
    page = root / "report.html"
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                          "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    status = re.search(r"id=\"plots-status\" data-loaded=\"(\d+)\" data-total=\"(\d+)\"", dom.stdout)
    assert status, dom.stdout[:2000]
    loaded, total = int(status.group(1)), int(status.group(2))
    assert total == page.read_text().count("class='plot'") and total >= 6 * len(STAGES)
    assert loaded == total
    assert len(re.findall(r"<section class=\"stage\" id=\"(stage\d_\w+)\"", dom.stdout)) == len(STAGES)
