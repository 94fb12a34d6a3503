"""Embedded synthetic data and tokenizer: real shards, real decoders, real tokenizer."""

from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import sys
import tarfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines import synth
from data_pipelines.tokenizer_train import train_tokenizer
from data_pipelines.training.special_tokens import (
    ALL_SPECIAL_TOKENS,
    IM_START,
    REASONING_OFF,
    REASONING_ON,
    THINK_CLOSE,
    THINK_OPEN,
)

NUM_PER_KIND = {"image": 40, "video": 12, "multi_image": 20, "text": 60}
REPO_ROOT = Path(__file__).resolve().parents[2]
# "A red circle." / "The square is blue." -> the colour the image must contain.
ANSWER_COLOUR = re.compile(r"(?:^|\n)(?:An?|The \w+ is) (\w+)(?: (?:circle|square|triangle))?\.$")


def read_samples(shard_dir: Path) -> list[dict]:
    """Group tar members by key: {"key", "json", "media": {suffix: bytes}}, in shard order."""
    samples: dict[str, dict] = {}
    for shard in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                sample = samples.setdefault(key, {"key": key, "json": None, "media": {}})
                data = tar.extractfile(member).read()
                if suffix == "json":
                    sample["json"] = json.loads(data)
                else:
                    sample["media"][suffix] = data
    return list(samples.values())


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    for kind, num in NUM_PER_KIND.items():
        synth.write_synthetic_shards(root / kind, kind, num, seed=7, samples_per_shard=16)
    return {kind: root / kind for kind in NUM_PER_KIND}


@pytest.fixture(scope="module")
def samples(shard_dirs: dict[str, Path]) -> dict[str, list[dict]]:
    return {kind: read_samples(path) for kind, path in shard_dirs.items()}


@pytest.mark.parametrize("kind", list(NUM_PER_KIND))
def test_shards_open_with_webdataset(shard_dirs: dict[str, Path], kind: str) -> None:
    shards = sorted(str(p) for p in shard_dirs[kind].glob("shard-*.tar"))
    assert len(shards) == -(-NUM_PER_KIND[kind] // 16)
    rows = list(wds.WebDataset(shards, shardshuffle=False))
    assert len(rows) == NUM_PER_KIND[kind]
    assert all(json.loads(row["json"])["source"] == f"synth_{kind}" for row in rows)


@pytest.mark.parametrize("kind", list(NUM_PER_KIND))
def test_schema_and_media_members_match_placeholders(samples: dict[str, list[dict]],
                                                     kind: str) -> None:
    for sample in samples[kind]:
        messages = sample["json"]["messages"]
        roles = [m["role"] for m in messages]
        assert roles[0] == "system" and len(roles) >= 3
        assert roles[1:] == ["user", "assistant"] * ((len(roles) - 1) // 2)
        user_text = "".join(m["content"] for m in messages if m["role"] == "user")
        num_images, num_videos = user_text.count("<image>"), user_text.count("<video>")
        image_members = sorted(s for s in sample["media"] if s.startswith("img"))
        video_members = sorted(s for s in sample["media"] if s.startswith("vid"))
        assert len(image_members) + len(video_members) == len(sample["media"])
        assert [s.split(".")[0] for s in image_members] == [f"img{i}" for i in range(num_images)]
        assert {s.split(".")[1] for s in image_members} <= {"jpg", "png"}
        assert video_members == [f"vid{i}.mp4" for i in range(num_videos)]
        expected = {"image": (1, 0), "video": (0, 1), "text": (0, 0)}.get(kind)
        if expected:
            assert (num_images, num_videos) == expected
        else:
            assert num_images in (2, 3) and num_videos == 0


def test_images_decode_with_varied_sizes_and_formats(samples: dict[str, list[dict]]) -> None:
    sizes, formats = set(), set()
    for sample in samples["image"] + samples["multi_image"]:
        for suffix, data in sample["media"].items():
            image = Image.open(io.BytesIO(data))
            image.load()
            formats.add(image.format)
            sizes.add(image.size)
            assert all(96 <= side <= 320 for side in image.size)
    assert formats == {"JPEG", "PNG"}
    assert any(w > 1.5 * h for w, h in sizes) and any(h > 1.5 * w for w, h in sizes)


def _colour_present(image: Image.Image, colour: str) -> bool:
    pixels = np.asarray(image.convert("RGB")).astype(int)
    close = np.abs(pixels - np.array(synth.COLOURS[colour])).max(axis=-1) < 40
    return int(close.sum()) > 50


def test_image_answers_match_pixels(samples: dict[str, list[dict]]) -> None:
    checked = 0
    for sample in samples["image"]:
        answer = sample["json"]["messages"][2]["content"]
        match = ANSWER_COLOUR.search(answer)
        if not match or match.group(1) not in synth.COLOURS:
            continue
        image = Image.open(io.BytesIO(sample["media"][next(iter(sample["media"]))]))
        assert _colour_present(image, match.group(1)), answer
        checked += 1
    assert checked > 0


def _object_centre(frame: np.ndarray) -> np.ndarray:
    """Centroid of the pixels that differ from the frame's most common (background) colour."""
    flat = frame.reshape(-1, 3).astype(int)
    values, counts = np.unique(flat, axis=0, return_counts=True)
    mask = np.abs(frame.astype(int) - values[counts.argmax()]).max(axis=-1) > 60
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def _pyav_frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_videos_decode_with_pyav_and_motion_matches_answer(samples: dict[str, list[dict]]) -> None:
    expected_motion = {
        "from left to right": (1, 0), "from right to left": (-1, 0),
        "from top to bottom": (0, 1), "from bottom to top": (0, -1),
    }
    for sample in samples["video"]:
        frames = _pyav_frames(sample["media"]["vid0.mp4"])
        assert len(frames) > 1
        height, width = frames[0].shape[:2]
        assert height % 2 == 0 and width % 2 == 0 and max(height, width) <= 128
        answer = sample["json"]["messages"][2]["content"]
        direction = next((d for d in expected_motion if d in answer), None)
        if direction:
            shift = _object_centre(frames[-1]) - _object_centre(frames[0])
            assert np.sign(np.round(shift / 8)).tolist() == list(expected_motion[direction]), answer


def test_videos_decode_with_decord(samples: dict[str, list[dict]]) -> None:
    decord = pytest.importorskip("decord")
    for sample in samples["video"]:
        reader = decord.VideoReader(io.BytesIO(sample["media"]["vid0.mp4"]))
        assert len(reader) > 1 and 4 <= reader.get_avg_fps() <= 8
        assert len(reader) == len(_pyav_frames(sample["media"]["vid0.mp4"]))
        assert reader[len(reader) - 1].asnumpy().shape[2] == 3


def test_same_seed_gives_identical_shards(tmp_path: Path) -> None:
    for kind in ("image", "video", "multi_image", "text"):
        for run in ("a", "b"):
            synth.write_synthetic_shards(tmp_path / run / kind, kind, 6, seed=3)
        synth.write_synthetic_shards(tmp_path / "other" / kind, kind, 6, seed=4)
        first = (tmp_path / "a" / kind / "shard-000000.tar").read_bytes()
        assert first == (tmp_path / "b" / kind / "shard-000000.tar").read_bytes()
        assert first != (tmp_path / "other" / kind / "shard-000000.tar").read_bytes()


def _function_from(user_content: str) -> Callable:
    """Execute the code block of a question independently of the generator."""
    source = re.search(r"```python\n(.*?)```", user_content, re.S).group(1)
    namespace: dict = {}
    exec(source, namespace)
    return namespace[re.search(r"def (\w+)\(", source).group(1)]


def test_text_answers_are_computed_by_the_code(samples: dict[str, list[dict]]) -> None:
    checked = 0
    for sample in samples["text"]:
        messages = sample["json"]["messages"]
        function = _function_from(messages[1]["content"])
        for user, assistant in zip(messages[1::2], messages[2::2]):
            question = re.search(r"return for input (.+)\?$", user["content"])
            if question:
                argument = ast.literal_eval(question.group(1))
                answer = re.search(r"It returns `(.+)`\.$", assistant["content"]).group(1)
                assert ast.literal_eval(answer) == function(argument)
                checked += 1
    assert checked >= NUM_PER_KIND["text"] // 2


def test_reasoning_flag_matches_think_block(samples: dict[str, list[dict]]) -> None:
    modes: dict[str, set[bool]] = defaultdict(set)
    for kind, kind_samples in samples.items():
        for sample in kind_samples:
            messages = sample["json"]["messages"]
            system = messages[0]["content"]
            reasoning_on = system.endswith(REASONING_ON)
            assert reasoning_on != system.endswith(REASONING_OFF)
            modes[kind].add(reasoning_on)
            for message in messages[2::2]:
                content = message["content"]
                if reasoning_on:
                    thought = content[len(THINK_OPEN):content.index(THINK_CLOSE)]
                    assert content.startswith(THINK_OPEN) and thought.strip()
                else:
                    assert content.startswith(THINK_OPEN + THINK_CLOSE)
    assert modes["text"] == {True, False}


def test_multi_turn_conversations_exist(samples: dict[str, list[dict]]) -> None:
    for kind in ("image", "text"):
        assert any(len(s["json"]["messages"]) >= 5 for s in samples[kind])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, samples: dict[str, list[dict]]) -> Path:
    texts = [m["content"] for kind in samples.values() for s in kind for m in s["json"]["messages"]]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=512)


def test_tokenizer_special_tokens_are_single_fixed_ids(tokenizer_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fast = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    assert isinstance(fast, PreTrainedTokenizerFast)
    assert len(tokenizer) == 512
    for index, token in enumerate(ALL_SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == index
        assert tokenizer.encode(token, add_special_tokens=False) == [index]
    ids = tokenizer.encode(f"{IM_START}user\nhi{THINK_OPEN}", add_special_tokens=False)
    assert ids[0] == ALL_SPECIAL_TOKENS.index(IM_START)
    assert ids[-1] == ALL_SPECIAL_TOKENS.index(THINK_OPEN)
    assert tokenizer.decode(ids) == f"{IM_START}user\nhi{THINK_OPEN}"
    text = "Überraschung: naïve café 😀 def f(x): return x"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_renders_chatml(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "system", "content": "/no_think"},
                {"role": "user", "content": "<image>\nhi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Reasoning off: the generation prompt opens the answer with an empty think, as training writes it.
    assert rendered == ("<|im_start|>system\n/no_think<|im_end|>\n"
                        "<|im_start|>user\n<image>\nhi<|im_end|>\n<|im_start|>assistant\n<think></think>")
    closed = tokenizer.apply_chat_template(messages, tokenize=False)
    assert closed.endswith("hi<|im_end|>\n")
    thinking = [{"role": "system", "content": "/think"}, messages[1]]
    assert tokenizer.apply_chat_template(thinking, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n")


def test_ensure_embedded_data_is_idempotent(tmp_path: Path) -> None:
    counts = {"image": 4, "video": 2, "multi_image": 2, "text": 6}
    data = synth.ensure_embedded_data(tmp_path / "embedded", counts, seed=1, vocab_size=400)
    marker = data.root / "COMPLETE"
    first_mtime = marker.stat().st_mtime_ns
    assert all(list(path.glob("shard-*.tar")) for path in data.shard_dirs.values())
    assert (data.tokenizer_dir / "tokenizer.json").exists()
    again = synth.ensure_embedded_data(tmp_path / "embedded", counts, seed=1, vocab_size=400)
    assert again == data and marker.stat().st_mtime_ns == first_mtime
    changed = synth.ensure_embedded_data(tmp_path / "embedded", counts, seed=2, vocab_size=400)
    assert json.loads((changed.root / "COMPLETE").read_text())["seed"] == 2
    assert not (tmp_path / ".embedded.staging").exists()


def test_ensure_embedded_data_generates_once_under_concurrency(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; "
            "from data_pipelines.synth import ensure_embedded_data; "
            "ensure_embedded_data(Path(sys.argv[1]), "
            "{'image': 4, 'video': 2, 'multi_image': 2, 'text': 6}, vocab_size=400)")
    root = tmp_path / "shared"
    processes = [subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    assert sum("generating" in out for out in outputs) == 1
    assert (root / "COMPLETE").exists()


def test_cli_writes_shards(tmp_path: Path) -> None:
    synth.main(["--out", str(tmp_path), "--kind", "text", "--num", "5", "--seed", "2",
                "--samples-per-shard", "2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shard-00000{i}.tar" for i in range(3)]
    assert len(read_samples(tmp_path)) == 5


def test_described_scenes_are_image_conversations_with_the_scene_as_text(tmp_path: Path) -> None:
    """The smoke LM's pre-training text: each user turn carries the scene written out where the image
    would be, and the answers are the image sample's (derived from that scene)."""
    data = synth.ensure_embedded_data(tmp_path / "embedded", {"image": 2, "video": 1, "multi_image": 1, "text": 2},
                                      seed=0, vocab_size=400)
    records = [json.loads(tar.extractfile(member).read()) for shard in sorted(data.described_dir.glob("shard-*.tar"))
               for tar in [tarfile.open(shard)] for member in tar.getmembers()]
    assert len(records) == synth.DESCRIBED_NUM and {r["source"] for r in records} == {"synth_described_image"}
    for record in records[:50]:
        first_user = record["messages"][1]["content"]
        assert "<image>" not in first_user and " background with " in first_user
    for index in range(20):  # an answer names only what the description says
        sample = synth.build_sample("described_image", 0, index)
        description, _ = sample.messages[1]["content"].split("\n", 1)
        answer = sample.messages[2]["content"].rsplit("\n", 1)[-1]
        named = [word for word in (*synth.COLOURS, *synth.SHAPES) if word in answer.lower().split(" ")
                 or f"{word}." in answer.lower() or f"{word}," in answer.lower()]
        assert all(word in description for word in named), (description, answer)
