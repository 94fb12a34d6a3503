"""`train.evaluate` and `eval.tasks`: the lm-eval harness on a smoke checkpoint, on CPU, over the
local task in tests/eval_tasks (no hub access); vision-language benchmarks (`--vlm-tasks`, `eval.vlm_tasks`)
on local Hub-layout copies; generation scoring; clear errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.integration.helpers import run_module
from tests.vlm_replicas import write_replicas

TASK = "tests/eval_tasks/hvl_tiny_choice.yaml"  # relative to the repository root (its data file too)
VLM_TASKS = ["chartqa", "docvqa_val"]  # the harness's own chartqa; docvqa_val shipped in train/evaluate/vlm_tasks


@pytest.fixture(scope="module")
def evaluated_stage(tmp_path_factory, project_root_dir):
    """A 2-step text stage whose end runs the local lm-eval task (run from the repo root, so the
    task's data path resolves; everything it writes goes to the temporary directory)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    run_dir = tmp / "run"
    # Local copies of two vision-language benchmarks in their Hub layout (tests/vlm_replicas.py): the
    # stage's end also runs the harness's chartqa and the shipped docvqa_val on the stage's VLM
    # (the real tiny model, end to end; answers capped at 3 tokens to keep it quick).
    data_dir = write_replicas(tmp / "hub_copies")
    result = run_module(["train", "--config-name", "stage3_text_recovery", "smoke=cpu", "trainer.max_steps=2",
                         f"data.synth_dir={tmp / 'synth'}", f"run.dir={run_dir}", f"eval.tasks=[{TASK}]",
                         f"eval.vlm_tasks=[{','.join(VLM_TASKS)}]", f"eval.vlm_data_dir={data_dir}",
                         "eval.vlm_max_new_tokens=3"],
                        project_root_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return tmp, run_dir


@pytest.fixture(scope="module")
def project_root_dir():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]


def test_stage_end_runs_its_tasks_and_the_cli_gives_the_same_scores(evaluated_stage, project_root_dir):
    tmp, run_dir = evaluated_stage
    summary = json.loads((run_dir / "summary.json").read_text())
    at_end = summary["lm_eval"]["results"]["hvl_tiny_choice"]
    assert at_end["sample_len"] == 8 and 0.0 <= at_end["acc,none"] <= 1.0
    saved = json.loads((run_dir / "eval" / "lm_eval_step_0000002.json").read_text())
    assert saved["results"]["hvl_tiny_choice"]["acc,none"] == at_end["acc,none"]
    # The export the harness read is what transformers loads: tokenizer and chat template included.
    assert (run_dir / "eval" / "hf_step_0000002" / "tokenizer_config.json").exists()

    out = tmp / "cli_eval"
    # The README's line: a hub task first. Offline (this machine), it is skipped in one line and the
    # local task still runs.
    result = run_module(["train.evaluate", "--ckpt", str(run_dir), "--tasks", "gsm8k", TASK, "--out", str(out)],
                        project_root_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping gsm8k: its data (openai/gsm8k) is on the Hugging Face Hub" in result.stderr
    assert "falling back to its reference PyTorch implementation" not in result.stderr, "CPU has no Mamba kernels"
    printed = json.loads(result.stdout)
    assert printed["lm_eval"]["results"]["hvl_tiny_choice"]["acc,none"] == at_end["acc,none"]
    assert "gsm8k" in printed["lm_eval"]["skipped"] and "gsm8k" not in printed["lm_eval"]["results"]
    assert (out / "lm_eval_step_0000002.json").exists()


def test_generation_is_scored_per_held_out_source(evaluated_stage, project_root_dir):
    tmp, run_dir = evaluated_stage
    result = run_module(["train.evaluate", "--ckpt", str(run_dir), "--generation", "--samples", "4",
                         "--max-new-tokens", "6"], project_root_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((run_dir / "eval" / "generation_step_0000002.json").read_text())
    assert set(scores) == {"synth_text"}  # the stage's val_sources
    text = scores["synth_text"]
    assert text["samples"] + sum(text["skipped"].values()) == 4
    assert text["samples"] >= 1 and 0.0 <= text["relaxed_match"] <= 1.0 and text["examples"]


def test_missing_or_damaged_checkpoints_fail_clearly(evaluated_stage, project_root_dir):
    tmp, run_dir = evaluated_stage
    missing = run_module(["train.evaluate", "--ckpt", str(tmp / "nowhere"), "--tasks", TASK], project_root_dir)
    assert missing.returncode == 2 and "evaluate error:" in missing.stderr and "Traceback" not in missing.stderr
    damaged = tmp / "damaged"
    shutil.copytree(run_dir, damaged, ignore=shutil.ignore_patterns("eval"))
    step = damaged / "checkpoints" / "step_0000002"
    for shard in step.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    result = run_module(["train.evaluate", "--ckpt", str(step), "--tasks", TASK], project_root_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "evaluate error:" in result.stderr and "damaged" in result.stderr and "Traceback" not in result.stderr
    assert not (damaged / "eval" / "hf_step_0000002").exists()
    converted = run_module(["train.convert", "native-to-hf", "--src", str(step), "--dst", str(tmp / "hf_damaged")],
                           project_root_dir)
    assert converted.returncode == 2 and "Traceback" not in converted.stderr, converted.stderr[-2000:]
    assert f"convert error: checkpoint {step} (step 2) cannot be read" in converted.stderr


# ------------------------------------------------------------------ vision-language benchmarks


def test_stage_end_scores_the_vlm_benchmarks_into_summary_and_reports(evaluated_stage):
    """eval.vlm_tasks ran at the stage's end on the real tiny VLM: the harness's metrics per task in
    summary.json, the results file, the stage report; the pipeline report's benchmark-by-stage table."""
    import yaml

    from train.config.schema import Config, from_dict
    from train.loop.pipeline import write_pipeline_summary

    tmp, run_dir = evaluated_stage
    summary = json.loads((run_dir / "summary.json").read_text())
    scores = summary["vlm_eval"]["results"]
    assert scores["chartqa"]["sample_len"] == 3 and scores["docvqa_val"]["sample_len"] == 2
    for value in (scores["chartqa"]["relaxed_accuracy,none"], scores["docvqa_val"]["anls,none"]):
        assert 0.0 <= value <= 1.0
    saved = json.loads((run_dir / "eval" / "vlm_eval_step_0000002.json").read_text())
    assert saved["results"]["docvqa_val"] == scores["docvqa_val"] and saved["think"] is False
    assert len(saved["examples"]["chartqa"]) == 3  # (target, answer) pairs, for a look
    assert "vlm docvqa_val anls" in (run_dir / "report.html").read_text()
    # A pipeline of two stages (this one twice, the second with other scores): one row per benchmark,
    # one column per stage, next to the forgetting curve.
    pipeline = tmp / "pipeline"
    for name, anls in (("stage1_image_sft", 0.25), ("stage3_text_recovery", 0.75)):
        shutil.copytree(run_dir, pipeline / name, ignore=shutil.ignore_patterns("eval", "checkpoints", "report*"))
        stage_summary = {**summary, "stage": name}
        stage_summary["vlm_eval"]["results"]["docvqa_val"]["anls,none"] = anls
        (pipeline / name / "summary.json").write_text(json.dumps(stage_summary))
    # The pipeline's summary.json: every benchmark after each stage (it also writes the report).
    configs = [from_dict(Config, {**yaml.safe_load((pipeline / name / "config.yaml").read_text()),
                                  "run": {"dir": str(pipeline / name)}}) for name in ("stage1_image_sft", "stage3_text_recovery")]
    write_pipeline_summary(pipeline, configs, [json.loads((pipeline / c.run.dir / "summary.json").read_text()) for c in configs])
    benchmarks = json.loads((pipeline / "summary.json").read_text())["benchmarks"]
    assert benchmarks["vlm docvqa_val anls"] == [{"stage": "stage1_image_sft", "score": 0.25},
                                                 {"stage": "stage3_text_recovery", "score": 0.75}]
    page = (pipeline / "report.html").read_text()
    table = page[page.index("<table id='benchmarks'>"):]
    table = table[:table.index("</table>")]
    assert "<th>stage1_image_sft</th><th>stage3_text_recovery</th>" in table
    assert "<tr><th>vlm docvqa_val anls</th><td>0.2500</td><td>0.7500</td></tr>" in table
    assert "lm-eval hvl_tiny_choice acc" in table


@pytest.fixture(scope="module")
def chat_model(evaluated_stage):
    from train.chat.session import load_chat_model

    return load_chat_model(evaluated_stage[1])


def test_forced_answers_score_one_and_zero_under_the_harness_metrics(evaluated_stage, chat_model, monkeypatch,
                                                                      tmp_path):
    """The harness's task definitions, unchanged, on the local copies: our model wrapped at its
    generation boundary (prompts built by training's preprocessing, tiles from the real images) and
    forced to answer right scores 1.0 on every metric, forced wrong 0.0."""
    from data_pipelines.training import special_tokens as st
    from tests.vlm_replicas import CHARTQA_ROWS, DOCVQA_ROWS, MMMU_ROWS
    from train.evaluate.vlm_harness import prepare_tasks, run_vlm_harness
    from train.evaluate.vlm_model import HybridVLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tmp, _ = evaluated_stage
    answers = {q: ("Final Answer: " + a[0], "Final Answer: no") for q, a in CHARTQA_ROWS}
    answers |= {q: (a[-1], "zzzz") for q, a in DOCVQA_ROWS}
    other = {"A": "B", "B": "A"}
    answers |= {q.split("<image 1>")[0]: (f"({letter})", f"({other[letter]})") for q, _, letter, _ in MMMU_ROWS}
    images_of = {q.split("<image 1>")[0]: count for q, _, _, count in MMMU_ROWS}
    image_token = chat_model.model.image_token_id
    img_start = chat_model.tokenizer.special_ids[st.IMG_START]

    class Forced(HybridVLM):
        right = True

        def generate_batch(self, prompts, max_new_tokens):
            out = []
            for ids, tiles in prompts:
                assert tiles.shape[0] >= 1 and image_token in ids  # the image went through training's tiling
                text = self.chat.tokenizer.hf.decode(ids)
                question = next(q for q in answers if q in text)
                # MMMU: every `<image N>` the question and options name is an image in the prompt
                # (the second row names both in its question and again as its options: 4).
                if question in images_of:
                    assert ids.count(img_start) == {1: 1, 2: 4}[images_of[question]], (question, ids.count(img_start))
                out.append(answers[question][0 if self.right else 1])
            return out

    # The harness's chartqa by its YAML path (the same task the fixture's stage ran by name): only its
    # directory is indexed, not all of lm-eval's tasks (seconds).
    import lm_eval.tasks

    tasks_dir = Path(lm_eval.tasks.__file__).parent
    names, manager = prepare_tasks([str(tasks_dir / "chartqa" / "chartqa.yaml"), "docvqa_val",
                                    str(tasks_dir / "mmmu" / "mmmu_art.yaml")], tmp / "hub_copies", tmp_path)
    assert names == ["chartqa", "docvqa_val", "mmmu_val_art"]
    for right, expected in ((True, 1.0), (False, 0.0)):
        Forced.right = right
        results = run_vlm_harness(Forced(chat=chat_model, batch_size=2), names, manager)["results"]
        assert results["docvqa_val"]["anls,none"] == expected
        assert results["mmmu_val_art"]["acc,none"] == expected
        for metric in ("exact_match,none", "relaxed_accuracy,none", "anywhere_accuracy,none"):
            assert results["chartqa"][metric] == expected, (metric, results["chartqa"])


def test_batched_generation_is_each_prompt_alone(chat_model):
    """Prompts of different token lengths (one image tiled, one not; a text-only one) decode together
    exactly as each decodes alone: no row sees another's length or padding."""
    import torch

    from tests.vlm_replicas import _png
    from train.chat.generate import greedy_batch, greedy_tokens
    from train.chat.session import build_prompt
    from train.model.language_model import stack_caches

    questions = [("<image>Which colour is the bar?", [_png(96, 64, 0, "A")]),
                 ("<image>Which colour is the bar?", [_png(192, 64, 1, "B")]),
                 ("How many shapes are there?", [])]
    prompts = [build_prompt(q, images, [], False, "", chat_model.cfg, chat_model.tokenizer) for q, images in questions]
    assert len({len(ids) for ids, _ in prompts}) == 3
    lm = chat_model.model.language_model
    with torch.no_grad():
        embeds = [chat_model.model.embed_inputs(torch.tensor([ids]), tiles) for ids, tiles in prompts]
        together = greedy_batch(lm, embeds, 6)
        alone = [list(greedy_tokens(lm, e, 6)) for e in embeds]
        # The logits too, not only their argmax: two decode steps of the stacked cache against each alone.
        capacity = max(e.shape[1] for e in embeds) + 2
        stacked = stack_caches([lm.prefill(e, capacity)[1] for e in embeds])
        caches = [lm.prefill(e, capacity)[1] for e in embeds]
        for step in range(2):
            tokens = torch.tensor([row[step] for row in alone])
            batched_logits = lm.decode_step(tokens, stacked)
            for row, cache in enumerate(caches):
                torch.testing.assert_close(batched_logits[row:row + 1], lm.decode_step(tokens[row:row + 1], cache),
                                           rtol=1e-5, atol=1e-5)
    assert together == alone and all(len(row) == 6 for row in together)


def test_a_video_request_is_prompted_as_training_prompts_a_video(chat_model):
    """A harness request carrying "video" (an MP4) goes through training's frame sampling and frame
    labels, and its answer is what the chat's own generation gives that prompt."""
    import random

    import torch
    from lm_eval.api.instance import Instance

    from data_pipelines.synth import encode_mp4, random_motion, render_motion
    from data_pipelines.training import special_tokens as st
    from data_pipelines.training.conversation import frame_label
    from train.chat.generate import greedy_tokens
    from train.evaluate.vlm_model import HybridVLM, answer_text

    motion = random_motion(random.Random(0))
    video = encode_mp4(render_motion(motion), motion.width, motion.height, motion.fps)
    context, visuals = f"{st.VIDEO_PLACEHOLDER}\nWhich way does the shape move?", {"video": [video]}
    model = HybridVLM.from_chat(chat_model)
    ids, tiles = model.prompt(context, visuals)
    frame_ids = chat_model.tokenizer.encode(frame_label(0, 0.0))  # the first frame's label, as training writes it
    assert tiles.shape[0] >= 2 and any(ids[i:i + len(frame_ids)] == frame_ids for i in range(len(ids)))
    request = Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 5}, visuals), 0)
    (answer,) = model.generate_until([request], disable_tqdm=True)
    with torch.no_grad():
        embeds = chat_model.model.embed_inputs(torch.tensor([ids]), tiles)
        alone = list(greedy_tokens(chat_model.model.language_model, embeds, 5, model.stop_ids))
    assert answer == answer_text(chat_model.tokenizer.hf.decode(alone, skip_special_tokens=False), [])


def test_vlm_cli_limit_batch_think_and_missing_data(evaluated_stage, project_root_dir, monkeypatch, capsys):
    """`train.evaluate --vlm-tasks` with --limit, --batch-size, --think; a task whose local copy is
    missing fails in one line that names the path looked for."""
    from train.evaluate.__main__ import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tmp, run_dir = evaluated_stage
    out = tmp / "cli_vlm"
    import lm_eval.tasks

    chartqa = Path(lm_eval.tasks.__file__).parent / "chartqa" / "chartqa.yaml"  # (by path: see above)
    code = main(["--ckpt", str(run_dir), "--vlm-tasks", str(chartqa), "--data-dir", str(tmp / "hub_copies"),
                 "--limit", "2", "--batch-size", "2", "--think", "--max-new-tokens", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    printed = json.loads(captured.out)["vlm_eval"]
    assert printed["think"] is True and printed["results"]["chartqa"]["sample_len"] == 2
    assert json.loads((out / "vlm_eval_step_0000002_think.json").read_text())["think"] is True

    empty = tmp / "no_copies"
    empty.mkdir()
    code = main(["--ckpt", str(run_dir), "--vlm-tasks", "docvqa_val", "--data-dir", str(empty)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("evaluate error: docvqa_val: its data is not present locally: "
                                            f"looked for {empty / 'lmms-lab' / 'DocVQA'}"), err
    assert not any("Traceback" in line for line in err)


def test_anls_is_the_docvqa_metric():
    import importlib.util

    from train.evaluate.vlm_harness import VLM_TASKS_DIR

    spec = importlib.util.spec_from_file_location("anls", VLM_TASKS_DIR / "anls.py")
    anls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anls)
    assert anls.anls("J. Smth", ["J. Smith"]) == 1 - 1 / 8  # one edit in eight characters
    assert anls.anls(" j.  SMITH ", ["nobody", "J. Smith"]) == 1.0  # case and spacing ignored, best reference
    assert anls.anls("Jones", ["J. Smith"]) == 0.0  # below the 0.5 threshold
