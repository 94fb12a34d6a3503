"""`python -m train.chat` on a real (two-step) stage-1 checkpoint, with a real image and video."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
import yaml

from data_pipelines.synth import encode_mp4, random_motion, random_scene, render_motion, render_scene
from data_pipelines.training.samples import SampleSpec, Tokenizer, build_sample
from data_pipelines.training.shards import expand_shard_paths, iter_shard
from data_pipelines.training.tiling import TilingConfig
from tests.integration.helpers import run_module
from train.chat.__main__ import main as chat_main
from train.config.schema import Config, from_dict
from train.chat.session import build_prompt, load_chat_model


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """(cwd, run dir, image file, video file); cwd holds the embedded data the stage generated."""
    cwd = tmp_path_factory.mktemp("chat")
    result = run_module(["train", "--config-name", "stage1_image_sft", "smoke=cpu", "trainer.max_steps=2",
                         "run.dir=runs/s1"], cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rng = random.Random(0)
    image = cwd / "shapes.jpg"
    render_scene(random_scene(rng, 2), rng).save(image, quality=90)
    motion = random_motion(rng)
    video = cwd / "motion.mp4"
    video.write_bytes(encode_mp4(render_motion(motion), motion.width, motion.height, motion.fps))
    return cwd, cwd / "runs" / "s1", image, video


def new_token_count(stderr: str) -> int:
    match = re.search(r"(\d+) new tokens in [\d.]+s = [\d.]+ tokens/s", stderr)
    assert match, stderr
    return int(match.group(1))


@pytest.fixture(scope="module")
def exported(trained_run):
    """{layout: HF directory} of the trained run, exported by the CLI as a user would."""
    cwd, run_dir, _, _ = trained_run
    dirs = {}
    for layout in ("lm", "vl"):
        result = run_module(["train.convert", "native-to-hf", "--src", str(run_dir), "--dst", f"hf_{layout}",
                             "--layout", layout], cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout)["tokenizer"] == str((cwd / "runs" / "synth_data" / "tokenizer").resolve())
        dirs[layout] = cwd / f"hf_{layout}"
    return dirs


def hf_pixel_inputs(tiles: torch.Tensor, export_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 tiles (N, 3, T, T) -> nemotron_h_omni's (pixel_values, image_grid_hw), normalised with the
    exported preprocessor_config.json (what its image processor does to a tile-sized image)."""
    pp = json.loads((export_dir / "preprocessor_config.json").read_text())
    mean, std = (torch.tensor(pp[key]).view(1, 3, 1, 1) for key in ("image_mean", "image_std"))
    pixels = (tiles.float() * pp["rescale_factor"] - mean) / std
    n, c, t, _ = pixels.shape
    p = pp["patch_size"]
    g = t // p
    patches = pixels.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n * g * g, c * p * p)
    return patches, torch.tensor([[g, g]] * n)


def test_chat_answer_about_an_image_is_what_transformers_generates(trained_run, exported):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    cwd, run_dir, image, _ = trained_run
    result = run_module(["train.chat", "--ckpt", str(run_dir), "--image", str(image), "--prompt", "What shape?",
                         "--max-new-tokens", "8"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    count = new_token_count(result.stderr)
    assert 1 <= count <= 8
    # The same prompt (training's layout: tiles + thumbnail) through transformers' own omni model,
    # loaded from the export with no arguments (every tensor of the class in it: nothing missing or
    # left over), and its generation config's stop tokens.
    chat = load_chat_model(run_dir)
    ids, tiles = build_prompt("What shape?", [image.read_bytes()], [], False, "", chat.cfg, chat.tokenizer)
    assert tiles.shape[0] > 1  # the seeded scene is cut into a grid of tiles plus the thumbnail
    hf, info = AutoModelForImageTextToText.from_pretrained(exported["vl"], output_loading_info=True)
    assert type(hf).__name__ == "NemotronH_Omni_Reasoning_V3"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    pixel_values, grid = hf_pixel_inputs(tiles, exported["vl"])
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), pixel_values=pixel_values, image_grid_hw=grid,
                          max_new_tokens=8)
    tokens = out[0, len(ids):].tolist()
    assert len(tokens) == count
    assert result.stdout == AutoTokenizer.from_pretrained(exported["vl"]).decode(tokens) + "\n"


def test_exported_lm_prompts_and_generates_like_chat(trained_run, exported, capsys):
    """AutoTokenizer + AutoModelForCausalLM on the LM export: the chat template renders the prompt
    train.chat builds (the `/no_think` system prompt opens the answer with `<think></think>`), and
    greedy generation with the exported generation config gives train.chat's tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir, _, _ = trained_run
    tokenizer = AutoTokenizer.from_pretrained(exported["lm"])
    model = AutoModelForCausalLM.from_pretrained(exported["lm"]).eval()
    chat = load_chat_model(run_dir)
    for think, system in ((False, "/no_think"), (True, "/think")):
        ids, _ = build_prompt("Write a function that adds two numbers.", [], [], think, "", chat.cfg, chat.tokenizer)
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": "Write a function that adds two numbers."}]
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False) == ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12)
        code = chat_main(["--ckpt", str(run_dir), "--prompt", "Write a function that adds two numbers.",
                          "--max-new-tokens", "12", *(["--think"] if think else [])])
        printed, err = capsys.readouterr()
        assert code == 0, err
        tokens = out[0, len(ids):].tolist()
        assert new_token_count(err) == len(tokens)
        assert printed == tokenizer.decode(tokens) + "\n"
    generation = json.loads((exported["lm"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]


def test_chat_on_a_video_in_reasoning_mode(trained_run, capsys):
    # In-process `main` (the subprocess path is covered above): same CLI, without a second torch start-up.
    _, run_dir, _, video = trained_run
    code = chat_main(["--ckpt", str(run_dir / "checkpoints" / "step_0000002"), "--video", str(video),
                      "--prompt", "Which direction does it move?", "--think", "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert 1 <= new_token_count(err) <= 6 and out.endswith("\n") and len(out) > 1
    frames = int(re.search(r"\((\d+) tiles\)", err).group(1))
    assert frames >= 2  # one tile per frame sampled at 2 fps from a clip of at least a second


def test_chat_reports_a_bad_image_without_a_traceback(trained_run, capsys):
    cwd, run_dir, _, _ = trained_run
    broken = cwd / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = chat_main(["--ckpt", str(run_dir / "checkpoints"), "--image", str(broken), "--prompt", "What shape?"])
    assert code == 2
    assert "chat error: corrupt_image" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["image", "video"])
def test_chat_prompt_is_what_training_feeds_before_the_answer(trained_run, kind):
    """Same conversation through the training sample builder and through the chat prompt: the
    chat ids are the training ids up to where the supervised answer starts (after the empty
    think pair when reasoning is off), and the media tiles are the same."""
    cwd, run_dir, _, _ = trained_run
    cfg = from_dict(Config, yaml.safe_load((run_dir / "config.yaml").read_text()))
    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    d = cfg.data
    spec = SampleSpec(seq_length=1 << 16, tokens_per_tile=cfg.model.tokens_per_tile,
                      tiling=TilingConfig(tile_size=d.tile_size, min_tiles=d.min_tiles, max_tiles=d.max_tiles,
                                          use_thumbnail=d.use_thumbnail),
                      video_fps=d.video_fps, max_frames=d.max_frames, chat_template=d.chat_template)
    shard = expand_shard_paths(str(cwd / "runs" / "synth_data" / kind))[0]
    modes = set()
    for raw, _ in zip(iter_shard(shard), range(8)):
        messages = json.loads(raw.members["json"])["messages"]
        system, marker = messages[0]["content"].rsplit("\n", 1)
        think = marker == "/think"
        modes.add(think)
        media = [raw.members[name] for name in sorted(raw.members) if name.startswith(("img", "vid"))]
        ids, tiles = build_prompt(messages[1]["content"], media if kind == "image" else [],
                                  media if kind == "video" else [], think, system, cfg, tokenizer)
        sample = build_sample(raw, kind, spec, tokenizer)
        assert sample.input_ids[:len(ids)].tolist() == ids
        answer_starts = int((sample.labels != -100).argmax())
        # The template opens a /no_think answer with `<think></think>` (as the released one does):
        # the prompt ends where the supervised answer starts, in both modes.
        assert answer_starts == len(ids)
        assert torch.equal(sample.tiles, tiles)
    assert modes == {True, False}  # both reasoning modes were compared
