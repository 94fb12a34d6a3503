"""Conversion of real jsonl / parquet / datasets-on-disk / LLaVA files into shards training loads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from data_pipelines import convert, synth
from data_pipelines.training.samples import SampleSpec, build_sample
from data_pipelines.training.shards import expand_shard_paths, iter_shard
from data_pipelines.training.tiling import TilingConfig

SPEC = SampleSpec(seq_length=2048, tokens_per_tile=4, tiling=TilingConfig(tile_size=64, max_tiles=4), max_frames=8)


def encoded(colour: tuple[int, int, int], size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    """images/{red.jpg, blue.png, green.gif} and clips/move.mp4, written by PIL and PyAV."""
    root = tmp_path_factory.mktemp("media")
    (root / "images").mkdir()
    (root / "clips").mkdir()
    (root / "images" / "red.jpg").write_bytes(encoded((220, 20, 20), (96, 48), "JPEG"))
    (root / "images" / "blue.png").write_bytes(encoded((20, 20, 220), (40, 80), "PNG"))
    (root / "images" / "green.gif").write_bytes(encoded((20, 200, 20), (50, 50), "GIF"))
    (root / "clips" / "move.mp4").write_bytes(synth.build_sample("video", seed=0, index=1).videos[0])
    return root


def user_assistant(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def load_all(out: Path, tokenizer) -> list:
    """Every sample of the output, built by the training path (raises on any bad one)."""
    return [(raw, build_sample(raw, "converted", SPEC, tokenizer))
            for shard in expand_shard_paths(str(out)) for raw in iter_shard(shard)]


def run(tmp_path: Path, fmt: str, input_path: Path, image_root: Path, per_shard: int = 2, workers: int = 1,
        out_name: str = "out") -> tuple[convert.ConvertReport, Path]:
    cfg = convert.ConvertConfig(str(input_path), fmt, str(image_root), "mine", per_shard)
    out = tmp_path / out_name
    return convert.convert(cfg, out, workers=workers, progress=False), out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


JSONL_ROWS = [
    {"messages": user_assistant("<image>\nWhat colour?", "Red."), "images": ["images/red.jpg"], "id": "a.1"},
    {"messages": user_assistant("Compare <image> and <image>.", "Blue, then green."),
     "images": ["images/blue.png", "images/green.gif"], "source": "pairs"},
    {"messages": user_assistant("<video>\nWhat moves?", "A shape."), "videos": ["clips/move.mp4"]},
    {"messages": user_assistant("<image>\nAnd this?", "Nothing."), "images": ["images/absent.jpg"]},
    {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "boop"}]},
    "{not json",
    {"messages": [{"role": "system", "content": "Be brief."}, *user_assistant("Hi.", "Hello.")]},
]


def test_jsonl_with_paths_and_bad_rows(tmp_path, media_root, tokenizer):
    report, out = run(tmp_path, "jsonl", write_jsonl(tmp_path / "rows.jsonl", JSONL_ROWS), media_root)
    assert report.num_rows == 7 and report.num_shards == 4 and report.samples == 4
    assert report.bad == {"bad_role": 1, "malformed_json": 1, "missing_media_file": 1}
    assert sorted(row for row, _, _ in report.bad_examples) == [3, 4, 5]

    built = load_all(out, tokenizer)
    assert [raw.key for raw, _ in built] == ["mine-000000000", "mine-000000001", "mine-000000002", "mine-000000006"]
    first, pair, video, text = (raw for raw, _ in built)
    assert first.members["img0.jpg"] == (media_root / "images" / "red.jpg").read_bytes()  # copied as is
    assert json.loads(first.members["json"])["id"] == "a.1"
    assert set(pair.members) == {"json", "img0.png", "img1.png"}  # the GIF was re-encoded as PNG
    assert Image.open(io.BytesIO(pair.members["img1.png"])).getpixel((0, 0)) == (20, 200, 20)
    assert json.loads(pair.members["json"])["source"] == "pairs"
    assert video.members["vid0.mp4"] == (media_root / "clips" / "move.mp4").read_bytes()
    assert built[2][1].tiles.shape[0] > 1  # frames decoded by the training path
    assert set(text.members) == {"json"}


def parts_row(question: str, answer: str, num_images: int) -> list[dict]:
    """HF chat-template content parts: [{"type": "image"}, {"type": "text", "text": ...}]."""
    user = [{"type": "image", "text": None}] * num_images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def test_parquet_with_image_structs_and_content_parts(tmp_path, tokenizer):
    red, blue = encoded((220, 20, 20), (96, 48), "JPEG"), encoded((20, 20, 220), (40, 80), "PNG")
    table = datasets.Dataset.from_dict(
        {"messages": [parts_row("What colour?", "Red.", 1), parts_row("Which is blue?", "The second.", 2),
                      parts_row("No image here, but one is attached?", "Yes.", 0)],
         "images": [[{"bytes": red, "path": None}], [{"bytes": red, "path": None}, {"bytes": blue, "path": None}],
                    [{"bytes": blue, "path": None}]]},
        features=datasets.Features({
            "messages": datasets.List({"role": datasets.Value("string"),
                                       "content": datasets.List({"type": datasets.Value("string"),
                                                                 "text": datasets.Value("string")})}),
            "images": datasets.List(datasets.Image())}))
    path = tmp_path / "train.parquet"
    table.to_parquet(str(path))

    report, out = run(tmp_path, "parquet", path, tmp_path, per_shard=2)
    assert report.samples == 3 and report.bad == {} and report.num_shards == 2
    built = load_all(out, tokenizer)
    raws = [raw for raw, _ in built]
    assert raws[1].members["img1.png"] == blue
    messages = json.loads(raws[0].members["json"])["messages"]
    assert messages[0]["content"] == "<image>\nWhat colour?"
    # An attached image without a placeholder opens the first user turn.
    assert json.loads(raws[2].members["json"])["messages"][0]["content"].startswith("<image>\n")


def test_hf_disk_with_paths_and_video_bytes(tmp_path, media_root, tokenizer):
    video = (media_root / "clips" / "move.mp4").read_bytes()
    ds = datasets.Dataset.from_dict({
        "messages": [user_assistant("<image>\nColour?", "Red."), user_assistant("<video>\nWhat moves?", "A shape."),
                     user_assistant("<image>\nColour?", "Unknown.")],
        "images": [["images/red.jpg"], [], ["images/nowhere.png"]],
        "videos": [[], [video], []],
        "source": ["hf_a", "hf_b", "hf_a"],
    })
    ds.save_to_disk(str(tmp_path / "saved"))

    report, out = run(tmp_path, "hf_disk", tmp_path / "saved", media_root, per_shard=3)
    assert report.samples == 2 and report.bad == {"missing_media_file": 1}
    built = load_all(out, tokenizer)
    assert [json.loads(raw.members["json"])["source"] for raw, _ in built] == ["hf_a", "hf_b"]
    assert built[1][0].members["vid0.mp4"] == video


def test_llava_format_given_json_lines_names_the_format_that_reads_it(tmp_path, capsys):
    rows = [{"id": str(i), "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
            for i in range(3)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = convert.main(["--input", str(path), "--format", "llava", "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "looks like JSON Lines (one object per line)" in err and "convert it with --format jsonl" in err
    path.write_text('[{"id": "1",')
    assert convert.main(["--input", str(path), "--format", "llava", "--out", str(tmp_path / "out2"),
                         "--no-progress"]) == 2
    assert "is not valid JSON (Expecting" in capsys.readouterr().err


def test_llava_json_with_image_folder_via_cli(tmp_path, media_root, tokenizer, capsys):
    records = [
        {"id": "1", "image": "images/red.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "2", "image": ["images/blue.png", "images/red.jpg"],
         "conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "<image>\n<image>\nSame colour?"}, {"from": "gpt", "value": "No."}]},
        {"id": "3", "image": "images/blue.png",  # no placeholder: LLaVA puts the image first
         "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A blue block."}]},
        {"id": "4", "image": "images/lost.jpg",
         "conversations": [{"from": "human", "value": "<image>\nHm?"}, {"from": "gpt", "value": "Hm."}]},
        {"id": "5", "conversations": [{"from": "narrator", "value": "Once"}, {"from": "gpt", "value": "upon"}]},
        {"id": "6", "image": "images/red.jpg",
         "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "Two?"}]},
    ]
    path = media_root / "llava.json"  # default image root: the json's folder
    path.write_text(json.dumps(records))
    out = tmp_path / "llava_out"
    code = convert.main(["--input", str(path), "--format", "llava", "--out", str(out), "--samples-per-shard", "4",
                         "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 rows -> 3 samples in 2 shards" in printed and "missing_media_file" in printed
    assert json.loads((out / "DONE").read_text())["bad"] == {"bad_role": 1, "missing_media_file": 1,
                                                             "placeholder_mismatch": 1}
    built = load_all(out, tokenizer)
    docs = [json.loads(raw.members["json"]) for raw, _ in built]
    assert [d["id"] for d in docs] == ["1", "2", "3"]
    assert docs[0]["source"] == "llava" and docs[0]["messages"][1]["role"] == "assistant"
    assert docs[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert docs[2]["messages"][0]["content"] == "<image>\nDescribe."
    assert built[1][1].tiles.shape[0] >= 2  # both images tiled


def test_same_bytes_for_any_worker_count_and_resume_redoes_only_missing(tmp_path, media_root):
    rows = [JSONL_ROWS[i % len(JSONL_ROWS)] for i in range(9)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    serial, out1 = run(tmp_path, "jsonl", path, media_root, per_shard=2, workers=1, out_name="serial")
    parallel, out2 = run(tmp_path, "jsonl", path, media_root, per_shard=2, workers=2, out_name="parallel")
    names = [f"shard-{k:06d}.tar" for k in range(5)]
    assert serial.written == parallel.written == names
    for name in names:
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes()

    # A rerun of a finished conversion writes nothing.
    again, _ = run(tmp_path, "jsonl", path, media_root, per_shard=2, out_name="parallel")
    assert again.written == [] and again.skipped == names and again.samples == serial.samples

    # Lose the DONE marker and one shard (and leave a half-written file behind): only that shard is redone.
    (out2 / "DONE").unlink()
    (out2 / "shard-000003.tar").unlink()
    (out2 / "shard-000003.tar.partial").write_bytes(b"half")
    before = {n: (out2 / n).stat().st_mtime_ns for n in names if n != "shard-000003.tar"}
    resumed, _ = run(tmp_path, "jsonl", path, media_root, per_shard=2, out_name="parallel")
    assert resumed.written == ["shard-000003.tar"] and len(resumed.skipped) == 4
    assert {n: (out2 / n).stat().st_mtime_ns for n in before} == before
    assert (out2 / "shard-000003.tar").read_bytes() == (out1 / "shard-000003.tar").read_bytes()
    assert (out2 / "DONE").exists() and not (out2 / "shard-000003.tar.partial").exists()
    assert resumed.samples == serial.samples and resumed.bad == serial.bad


def test_other_arguments_into_the_same_out_are_refused(tmp_path, media_root, capsys):
    path = write_jsonl(tmp_path / "rows.jsonl", JSONL_ROWS)
    args = ["--input", str(path), "--format", "jsonl", "--out", str(tmp_path / "o"), "--image-root", str(media_root),
            "--no-progress"]
    assert convert.main(args + ["--samples-per-shard", "2"]) == 0
    assert convert.main(args + ["--samples-per-shard", "3"]) == 2
    assert "samples_per_shard" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--input", str(tmp_path / "nope.jsonl"), "--format", "jsonl", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2


def test_hub_layouts_convert_without_code(tmp_path, media_root, tokenizer):
    """the_cauldron (parquet, image structs), LLaVA as an HF dataset (save_to_disk, image paths,
    human/gpt) and ShareGPT jsonl all convert, and training reads what they wrote."""
    red = encoded((220, 20, 20), (96, 48), "JPEG")
    cauldron = datasets.Dataset.from_dict(
        {"images": [[{"bytes": red, "path": None}]],
         "texts": [[{"user": "What colour is it?", "assistant": "Red.", "source": "x"},
                    {"user": "Sure?", "assistant": "Yes."}]]},
        features=datasets.Features({"images": datasets.List(datasets.Image()),
                                    "texts": datasets.List({"user": datasets.Value("string"),
                                                            "assistant": datasets.Value("string"),
                                                            "source": datasets.Value("string")})}))
    cauldron.to_parquet(str(tmp_path / "cauldron.parquet"))
    report, out = run(tmp_path, "parquet", tmp_path / "cauldron.parquet", tmp_path, out_name="cauldron")
    assert report.samples == 1 and report.bad == {}
    (raw, sample), = load_all(out, tokenizer)
    messages = json.loads(raw.members["json"])["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "<image>\nWhat colour is it?" and raw.members["img0.jpg"] == red

    llava = datasets.Dataset.from_dict({"id": ["l1"], "image": ["images/blue.png"], "conversations": [
        [{"from": "human", "value": "<image>\nWhich colour?"}, {"from": "gpt", "value": "Blue."}]]})
    llava.save_to_disk(str(tmp_path / "llava_ds"))
    report, out = run(tmp_path, "hf_disk", tmp_path / "llava_ds", media_root, out_name="llava")
    assert report.samples == 1 and report.bad == {}
    (raw, _), = load_all(out, tokenizer)
    assert json.loads(raw.members["json"])["messages"][1] == {"role": "assistant", "content": "Blue."}

    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"id": "s1", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}])
    report, out = run(tmp_path, "jsonl", sharegpt, tmp_path, out_name="sharegpt")
    assert report.samples == 1 and report.bad == {}
    assert len(load_all(out, tokenizer)) == 1


def test_nothing_converted_is_a_failure_that_names_the_layout(tmp_path, capsys):
    rows = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "Say hi.", "response": "Hi."}] * 3)
    code = convert.main(["--input", str(rows), "--format", "jsonl", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "no row of 3 converted (unrecognised_layout 3)" in err and "`conversations`" in err
    assert "row fields ['prompt', 'response']" in err
