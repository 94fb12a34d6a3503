"""Tiny local copies of vision-language benchmark repositories, laid out and typed as on the Hub, for
tests of `train.evaluate --vlm-tasks --data-dir`: the files `huggingface-cli download --repo-type
dataset REPO --local-dir ROOT/REPO` would write (a README whose YAML header declares the configs and
their split files, parquet shards written with the dataset's features, images in the Image feature
as encoded bytes), with a handful of rows whose answers the tests know.

- HuggingFaceM4/ChartQA: one default config, splits train/val/test in data/<split>-*.parquet;
  columns image (Image), query (string), label (list of string), human_or_machine (ClassLabel).
- lmms-lab/DocVQA: configs DocVQA and InfographicVQA, splits validation/test in
  <config>/<split>-*.parquet; columns questionId, question, question_types, image, docId,
  ucsf_document_id, ucsf_document_page_no, answers, data_split.
- MMMU/MMMU: one config per subject (here Art), splits dev/validation/test in
  <Subject>/<split>-*.parquet; columns id, question, options (a Python list's repr), explanation,
  image_1 .. image_7 (Image, None where unused), img_type, answer (a letter), topic_difficulty,
  question_type, subfield. Questions and options name their images as `<image N>`.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

# (question, answers) of each replica; a model forced to answer answers[0] is right on every row.
CHARTQA_ROWS = [("What is the value of the blue bar?", ["42"]), ("Which bar is the tallest?", ["Green"]),
                ("How many bars are there?", ["3"])]
DOCVQA_ROWS = [("What is the date on the letter?", ["March 3, 1975", "3/3/1975"]),
               ("Who signed the form?", ["J. Smith"])]
# (question, options, answer letter, images the question and options refer to); the second names
# one image twice, as real MMMU rows do (the harness then passes it twice).
MMMU_ROWS = [("Which painting style is shown in <image 1>?", ["Cubism", "Impressionism", "Baroque"], "A", 1),
             ("Which of <image 1> and <image 2> is older?", ["<image 1>", "<image 2>"], "B", 2)]


def _png(width: int, height: int, seed: int, text: str) -> bytes:
    """A real encoded image with a few shapes and some text (its size differs per row, as real ones do)."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i in range(3):
        x = 10 + i * width // 4
        draw.rectangle([x, height // (2 + (seed + i) % 3), x + width // 6, height - 10], fill=(40 * i, 90, 200 - 50 * i))
    draw.text((5, 5), text, fill=(0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_readme(repo_dir: Path, configs: list[tuple[str, dict[str, str]]]) -> None:
    lines = ["---", "configs:"]
    for name, files in configs:
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {pattern}" for split, pattern in files.items()]
    (repo_dir / "README.md").write_text("\n".join(lines + ["---", "", "Test replica.", ""]))


def write_chartqa(root: Path) -> Path:
    from datasets import ClassLabel, Dataset, Features, Image as ImageFeature, Sequence, Value

    repo = root / "HuggingFaceM4" / "ChartQA"
    (repo / "data").mkdir(parents=True, exist_ok=True)
    features = Features({"image": ImageFeature(), "query": Value("string"), "label": Sequence(Value("string")),
                         "human_or_machine": ClassLabel(names=["human", "machine"])})
    for split, rows in (("train", CHARTQA_ROWS[:1]), ("val", CHARTQA_ROWS[:1]), ("test", CHARTQA_ROWS)):
        data = {"image": [{"bytes": _png(96 + 40 * i, 64 + 16 * i, i, q[:8]), "path": None} for i, (q, _) in enumerate(rows)],
                "query": [q for q, _ in rows], "label": [a for _, a in rows], "human_or_machine": [i % 2 for i in range(len(rows))]}
        Dataset.from_dict(data, features=features).to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    _write_readme(repo, [("default", {s: f"data/{s}-*" for s in ("train", "val", "test")})])
    return repo


def write_docvqa(root: Path) -> Path:
    from datasets import Dataset, Features, Image as ImageFeature, Sequence, Value

    repo = root / "lmms-lab" / "DocVQA"
    features = Features({"questionId": Value("string"), "question": Value("string"),
                         "question_types": Sequence(Value("string")), "image": ImageFeature(), "docId": Value("int64"),
                         "ucsf_document_id": Value("string"), "ucsf_document_page_no": Value("string"),
                         "answers": Sequence(Value("string")), "data_split": Value("string")})
    for config in ("DocVQA", "InfographicVQA"):
        (repo / config).mkdir(parents=True, exist_ok=True)
        for split in ("validation", "test"):
            rows = DOCVQA_ROWS
            data = {"questionId": [str(1000 + i) for i in range(len(rows))], "question": [q for q, _ in rows],
                    "question_types": [["form"] for _ in rows],
                    "image": [{"bytes": _png(120, 160 + 32 * i, i, "DOC"), "path": None} for i in range(len(rows))],
                    "docId": list(range(len(rows))), "ucsf_document_id": ["xnbl0037"] * len(rows),
                    "ucsf_document_page_no": ["1"] * len(rows),
                    "answers": [a if split == "validation" else [] for _, a in rows], "data_split": [split] * len(rows)}
            Dataset.from_dict(data, features=features).to_parquet(str(repo / config / f"{split}-00000-of-00001.parquet"))
    _write_readme(repo, [(c, {s: f"{c}/{s}-*" for s in ("validation", "test")}) for c in ("DocVQA", "InfographicVQA")])
    return repo


def write_mmmu(root: Path) -> Path:
    from datasets import Dataset, Features, Image as ImageFeature, Value

    repo = root / "MMMU" / "MMMU"
    (repo / "Art").mkdir(parents=True, exist_ok=True)
    images = [f"image_{i}" for i in range(1, 8)]
    features = Features({"id": Value("string"), "question": Value("string"), "options": Value("string"),
                         "explanation": Value("string"), **{name: ImageFeature() for name in images},
                         "img_type": Value("string"), "answer": Value("string"), "topic_difficulty": Value("string"),
                         "question_type": Value("string"), "subfield": Value("string")})
    for split in ("dev", "validation", "test"):
        data = {"id": [f"{split}_Art_{i + 1}" for i in range(len(MMMU_ROWS))], "question": [r[0] for r in MMMU_ROWS],
                "options": [repr(r[1]) for r in MMMU_ROWS], "explanation": [""] * len(MMMU_ROWS),
                **{name: [{"bytes": _png(80 + 24 * n, 72, n, f"ART{n}"), "path": None} if n < r[3] else None
                          for r in MMMU_ROWS] for n, name in enumerate(images)},
                "img_type": ["['Paintings']"] * len(MMMU_ROWS), "answer": [r[2] if split != "test" else "?" for r in MMMU_ROWS],
                "topic_difficulty": ["Easy"] * len(MMMU_ROWS), "question_type": ["multiple-choice"] * len(MMMU_ROWS),
                "subfield": ["Art History"] * len(MMMU_ROWS)}
        Dataset.from_dict(data, features=features).to_parquet(str(repo / "Art" / f"{split}-00000-of-00001.parquet"))
    _write_readme(repo, [("Art", {s: f"Art/{s}-*" for s in ("dev", "validation", "test")})])
    return repo


def write_replicas(root: Path) -> Path:
    """The replicas under `root` (the --data-dir to give); returns root."""
    write_chartqa(root)
    write_docvqa(root)
    write_mmmu(root)
    return root
