"""Embedded synthetic data: real shards with answers derivable from the media or code.

The smoke runs and tests need every stage's data kind (captions/VQA, video, multi-image,
code-reasoning text) without downloads. Everything is generated from a seed, so the same
seed gives byte-identical shards, and answers are computed from the scene or by executing
the code, so a model can actually learn them.

CLI: `python -m data_pipelines.synth --out DIR --kind image|video|multi_image|text --num N
--seed S [--samples-per-shard K]`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import io
import json
import random
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines.tokenizer_train import train_tokenizer
from data_pipelines.training.special_tokens import (
    IMAGE_PLACEHOLDER,
    REASONING_OFF,
    REASONING_ON,
    THINK_CLOSE,
    THINK_OPEN,
    VIDEO_PLACEHOLDER,
)

KINDS = ("image", "video", "multi_image", "text")
DEFAULT_NUM_PER_KIND = {"image": 160, "video": 48, "multi_image": 64, "text": 240}
DEFAULT_SAMPLES_PER_SHARD = 32
# Held-out shards next to the training ones (`<root>/heldout/<kind>`): other seeds, so other keys
# and contents; the validation sources of the smoke runs read them.
HELDOUT_NUM_PER_KIND = {"image": 8, "video": 4, "multi_image": 4, "text": 16}
HELDOUT_SEED_OFFSET = 1_000_003
# The smoke forgetting monitor's own held-out code-reasoning text (`<root>/heldout/monitor`), apart
# from the `heldout/text` validation shards: a third seed, so its loss is a number of its own.
MONITOR_NUM, MONITOR_SEED_OFFSET = 16, 2_000_003
# The image scenes written as text (`<root>/described_image`), the smoke LM's pre-training data:
# a fourth seed, so none of them is a scene of the image shards. Not a training kind of any stage.
DESCRIBED_NUM, DESCRIBED_SEED_OFFSET = 2048, 3_000_003
# Bump when the generated content changes, so stale embedded data is regenerated.
SYNTH_VERSION = 4  # 2: /no_think generation prompt opens `<think></think>`; held-out shards. 3: monitor shards.
# 4: described_image shards

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "orange": (245, 130, 20),
    "purple": (130, 40, 170),
    "pink": (240, 120, 190),
    "brown": (120, 70, 30),
    "black": (10, 10, 10),
}
# Backgrounds are never shape colours, so "what colour" questions stay unambiguous.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light gray": (205, 205, 205),
    "beige": (235, 225, 195),
}
SHAPES = ("circle", "square", "triangle")
WORDS = (
    "apple", "river", "cloud", "tiger", "lemon", "piano", "robot", "stone", "maple",
    "ocean", "candle", "rocket", "garden", "pencil", "castle", "bridge", "forest",
    "window", "spoon", "tulip", "zebra", "violin", "comet", "island", "hat", "key",
)
ORDINALS = ("first", "second", "third")
NUMBER_WORDS = ("zero", "one", "two", "three")
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful vision-language assistant. Answer concisely.",
    "You are a precise assistant for images, videos and code.",
)


# ---------------------------------------------------------------------------------------
# Conversation helpers
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One question/answer exchange; `reasoning` fills the think block in reasoning mode."""

    question: str
    answer: str
    reasoning: str


@dataclass(frozen=True)
class SynthSample:
    """A conversation and its encoded media, in placeholder order."""

    messages: list[dict[str, str]]
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (extension, bytes)
    videos: list[bytes] = field(default_factory=list)  # MP4 bytes


def _assistant_content(turn: Turn, reasoning_on: bool) -> str:
    """Reasoning mode opens with a filled think block; otherwise with an empty pair."""
    if reasoning_on:
        return f"{THINK_OPEN}\n{turn.reasoning}\n{THINK_CLOSE}\n{turn.answer}"
    return f"{THINK_OPEN}{THINK_CLOSE}\n{turn.answer}"


def _conversation(rng: random.Random, turns: list[Turn],
                  reasoning_prob: float) -> list[dict[str, str]]:
    """System prompt carrying the reasoning flag, then alternating user/assistant turns."""
    reasoning_on = rng.random() < reasoning_prob
    flag = REASONING_ON if reasoning_on else REASONING_OFF
    messages = [{"role": "system", "content": f"{rng.choice(SYSTEM_PROMPTS)}\n{flag}"}]
    for turn in turns:
        messages.append({"role": "user", "content": turn.question})
        messages.append({"role": "assistant", "content": _assistant_content(turn, reasoning_on)})
    return messages


def _list_phrase(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _a(phrase: str) -> str:
    """Prefix the indefinite article ('an orange circle')."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """What an image shows; every answer about the image is derived from this."""

    width: int
    height: int
    background: str
    shapes: list[tuple[str, str]]  # (colour, shape), in reading order
    word: str

    @property
    def horizontal(self) -> bool:
        """Shapes are laid out along the longer side."""
        return self.width >= self.height

    def shape_phrases(self) -> list[str]:
        return [_a(f"{colour} {shape}") for colour, shape in self.shapes]

    def description(self) -> str:
        direction = "from left to right" if self.horizontal else "from top to bottom"
        shapes = _list_phrase(self.shape_phrases())
        if len(self.shapes) > 1:
            shapes = f"{shapes} ({direction})"
        return (
            f"{_a(self.background).capitalize()} background with {shapes}. "
            f'The word "{self.word}" is written in black at the top.'
        )


def _image_size(rng: random.Random, low: int, high: int) -> tuple[int, int]:
    """Square, wide and tall images, so tiling sees varied aspect ratios."""
    aspect = rng.choice(("square", "wide", "tall", "any"))
    if aspect == "square":
        side = rng.randint(low, high)
        return side, side
    if aspect == "any":
        return rng.randint(low, high), rng.randint(low, high)
    long_side = rng.randint(max(low * 2, high * 2 // 3), high)
    short_side = rng.randint(low, max(low, long_side // 2))
    return (long_side, short_side) if aspect == "wide" else (short_side, long_side)


def random_scene(rng: random.Random, num_shapes: int | None = None, *, low: int = 96,
                 high: int = 320, word: str | None = None,
                 colours: list[str] | None = None) -> Scene:
    """Distinct shapes in distinct colours, so every question has a single answer."""
    width, height = _image_size(rng, low, high)
    count = num_shapes if num_shapes is not None else rng.randint(1, 3)
    chosen_colours = colours if colours is not None else rng.sample(list(COLOURS), count)
    shapes = list(zip(chosen_colours, rng.sample(SHAPES, count)))
    return Scene(width, height, rng.choice(list(BACKGROUNDS)), shapes, word or rng.choice(WORDS))


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's bundled default font; cached because loading it dominates small renders."""
    return ImageFont.load_default(size=size)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """Word in a top strip, shapes in equal slots below it along the longer side."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    text_height = max(14, scene.height // 6)
    draw.text((4, 2), scene.word, fill=COLOURS["black"], font=_font(text_height - 4))
    top, count = text_height + 2, len(scene.shapes)
    area_w, area_h = scene.width, scene.height - top
    slot_w = area_w / count if scene.horizontal else area_w
    slot_h = area_h if scene.horizontal else area_h / count
    for index, (colour, shape) in enumerate(scene.shapes):
        size = min(slot_w, slot_h) * rng.uniform(0.5, 0.8)
        cx = (index + 0.5) * slot_w if scene.horizontal else area_w / 2
        cy = top + ((index + 0.5) * slot_h if not scene.horizontal else area_h / 2)
        cx += rng.uniform(-0.1, 0.1) * (slot_w - size)
        cy += rng.uniform(-0.1, 0.1) * (slot_h - size)
        box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
        _draw_shape(draw, shape, box, COLOURS[colour])
    return image


def encode_image(image: Image.Image, rng: random.Random) -> tuple[str, bytes]:
    """JPEG or PNG at random, so both decoders are exercised."""
    buffer = io.BytesIO()
    if rng.random() < 0.6:
        image.save(buffer, format="JPEG", quality=90)
        return "jpg", buffer.getvalue()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def _count_turn(scene: Scene) -> Turn:
    count = len(scene.shapes)
    verb, noun = ("is", "shape") if count == 1 else ("are", "shapes")
    return Turn(
        "How many shapes are in the image?",
        f"There {verb} {NUMBER_WORDS[count]} {noun}.",
        f"I can see {_list_phrase(scene.shape_phrases())}. "
        f"Counting them gives {_plural(count, 'shape')}.",
    )


def _single_shape_turn(scene: Scene) -> Turn:
    colour, shape = scene.shapes[0]
    return Turn(
        "What shape is in the image?",
        f"{_a(f'{colour} {shape}').capitalize()}.",
        f"There is one shape. It is {colour} and has the outline of a {shape}.",
    )


def _colour_turn(scene: Scene, rng: random.Random) -> Turn:
    colour, shape = rng.choice(scene.shapes)
    return Turn(
        f"What colour is the {shape}?",
        f"The {shape} is {colour}.",
        f"The shapes are {_list_phrase(scene.shape_phrases())}. The {shape} is filled in {colour}.",
    )


def _word_turn(scene: Scene) -> Turn:
    return Turn(
        "What word is written in the image?",
        scene.word,
        f'The text at the top of the image reads "{scene.word}".',
    )


def _position_turn(scene: Scene, rng: random.Random) -> Turn:
    index = rng.randrange(len(scene.shapes))
    colour, shape = scene.shapes[index]
    side = "left" if scene.horizontal else "top"
    return Turn(
        f"Which shape is {ORDINALS[index]} from the {side}?",
        f"The {colour} {shape}.",
        f"Going from the {side}, the shapes are {_list_phrase(scene.shape_phrases())}. "
        f"Number {index + 1} is the {colour} {shape}.",
    )


def _caption_turn(scene: Scene, rng: random.Random) -> Turn:
    prompt = rng.choice(("Describe the image.", "Write a short caption for this image.",
                         "What is shown in this picture?"))
    return Turn(prompt, scene.description(), "I will list the background, the shapes and the text.")


def _image_turns(scene: Scene, rng: random.Random) -> list[Turn]:
    """All questions answerable for this scene, caption first (stage 0 trains on captions)."""
    turns = [_caption_turn(scene, rng), _count_turn(scene), _colour_turn(scene, rng),
             _word_turn(scene)]
    single = len(scene.shapes) == 1
    turns.append(_single_shape_turn(scene) if single else _position_turn(scene, rng))
    return turns


def _sampled_image_turns(rng: random.Random) -> tuple[Scene, list[Turn]]:
    """A scene and the turns of one conversation about it: a third are captions, a quarter of the
    rest two-turn conversations."""
    scene = random_scene(rng)
    candidates = _image_turns(scene, rng)
    if rng.random() < 0.33:
        return scene, [candidates[0]]
    return scene, rng.sample(candidates[1:], 2 if rng.random() < 0.25 else 1)


def build_image_sample(rng: random.Random) -> SynthSample:
    """One image and a conversation about it."""
    scene, turns = _sampled_image_turns(rng)
    first = turns[0]
    turns[0] = Turn(f"{IMAGE_PLACEHOLDER}\n{first.question}", first.answer, first.reasoning)
    image = encode_image(render_scene(scene, rng), rng)
    return SynthSample(_conversation(rng, turns, reasoning_prob=0.25), images=[image])


def build_described_image_sample(rng: random.Random) -> SynthSample:
    """An image sample's conversation with the scene written out as text where the image would be.

    Text only: what the smoke pipeline's language model is pre-trained on before Stage 0 (as the
    real recipe's LM is trained before it), so the LM learns to answer from a scene described far
    back in its context, and the Stage 0 projector has something to learn to write into."""
    scene, turns = _sampled_image_turns(rng)
    first = turns[0]
    turns[0] = Turn(f"{scene.description()}\n{first.question}", first.answer, first.reasoning)
    return SynthSample(_conversation(rng, turns, reasoning_prob=0.25))


# ---------------------------------------------------------------------------------------
# Multi-image
# ---------------------------------------------------------------------------------------


def _scenes(rng: random.Random, counts: list[int], words: list[str] | None = None) -> list[Scene]:
    words = words or [rng.choice(WORDS) for _ in counts]
    return [random_scene(rng, n, low=96, high=224, word=w) for n, w in zip(counts, words)]


def _more_shapes_turn(rng: random.Random) -> tuple[list[Scene], Turn]:
    num_images = rng.randint(2, 3)
    counts = rng.sample((1, 2, 3), num_images)  # distinct counts: a unique winner
    scenes = _scenes(rng, counts)
    winner = counts.index(max(counts))
    reasoning = " ".join(
        f"The {ORDINALS[i]} image has {_plural(n, 'shape')}." for i, n in enumerate(counts))
    return scenes, Turn("Which image has more shapes?", f"The {ORDINALS[winner]} image.", reasoning)


def _same_colour_turn(rng: random.Random) -> tuple[list[Scene], Turn]:
    first = rng.choice(list(COLOURS))
    second = first if rng.random() < 0.5 else rng.choice([c for c in COLOURS if c != first])
    scenes = [random_scene(rng, 1, low=96, high=224, colours=[c]) for c in (first, second)]
    answer = (f"Yes, both shapes are {first}." if first == second
              else f"No. The first image shows {_a(first)} shape and the second {_a(second)} one.")
    reasoning = f"The first shape is {first}; the second shape is {second}."
    return scenes, Turn("Do both images show the same colour?", answer, reasoning)


def _total_turn(rng: random.Random) -> tuple[list[Scene], Turn]:
    counts = [rng.randint(1, 3) for _ in range(rng.randint(2, 3))]
    scenes = _scenes(rng, counts)
    total = sum(counts)
    reasoning = " + ".join(str(n) for n in counts) + f" = {total}."
    return scenes, Turn("How many shapes are there across all the images?",
                        f"There are {total} shapes in total.", reasoning)


def _which_word_turn(rng: random.Random) -> tuple[list[Scene], Turn]:
    num_images = rng.randint(2, 3)
    words = rng.sample(WORDS, num_images)
    scenes = _scenes(rng, [rng.randint(1, 3) for _ in words], words)
    target = rng.randrange(num_images)
    reasoning = " ".join(f'The {ORDINALS[i]} image says "{w}".' for i, w in enumerate(words))
    return scenes, Turn(f'Which image has the word "{words[target]}" written on it?',
                        f"The {ORDINALS[target]} image.", reasoning)


def _describe_each_turn(rng: random.Random) -> tuple[list[Scene], Turn]:
    scenes = _scenes(rng, [rng.randint(1, 3) for _ in range(rng.randint(2, 3))])
    answer = " ".join(f"Image {i + 1}: {s.description()}" for i, s in enumerate(scenes))
    reasoning = "I will go through the images in order."
    return scenes, Turn("Describe each image briefly.", answer, reasoning)


MULTI_IMAGE_QUESTIONS: tuple[Callable[[random.Random], tuple[list[Scene], Turn]], ...] = (
    _more_shapes_turn, _same_colour_turn, _total_turn, _which_word_turn, _describe_each_turn,
)


def build_multi_image_sample(rng: random.Random) -> SynthSample:
    """2-3 images with one placeholder each, and a question that compares them."""
    scenes, turn = rng.choice(MULTI_IMAGE_QUESTIONS)(rng)
    header = "\n".join(f"Image {i + 1}: {IMAGE_PLACEHOLDER}" for i in range(len(scenes)))
    turn = Turn(f"{header}\n{turn.question}", turn.answer, turn.reasoning)
    images = [encode_image(render_scene(scene, rng), rng) for scene in scenes]
    return SynthSample(_conversation(rng, [turn], reasoning_prob=0.25), images=images)


# ---------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------

VIDEO_SIZES = ((64, 64), (96, 64), (64, 96), (112, 80), (128, 96), (80, 64))
DIRECTIONS = {  # name -> (start (x, y), end (x, y)) as fractions of the free travel range
    "from left to right": ((0.0, None), (1.0, None)),
    "from right to left": ((1.0, None), (0.0, None)),
    "from top to bottom": ((None, 0.0), (None, 1.0)),
    "from bottom to top": ((None, 1.0), (None, 0.0)),
}


@dataclass(frozen=True)
class Motion:
    """A coloured shape crossing a plain background; answers come from these fields."""

    width: int
    height: int
    fps: int
    num_frames: int
    background: str
    colour: str
    shape: str
    direction: str
    cross: float  # fixed position across the direction of travel, as a fraction

    def description(self) -> str:
        return (f"{_a(self.colour).capitalize()} {self.shape} moves {self.direction} "
                f"across {_a(self.background)} background.")


def random_motion(rng: random.Random) -> Motion:
    width, height = rng.choice(VIDEO_SIZES)
    fps = rng.randint(4, 8)
    return Motion(width, height, fps, fps * rng.randint(1, 4), rng.choice(list(BACKGROUNDS)),
                  rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS)),
                  rng.uniform(0.2, 0.8))


def render_motion(motion: Motion) -> Iterator[np.ndarray]:
    """Yields (H, W, 3) uint8 RGB frames with the object moving linearly edge to edge."""
    size = min(motion.width, motion.height) // 3
    start, end = DIRECTIONS[motion.direction]
    travel_x, travel_y = motion.width - size, motion.height - size
    for index in range(motion.num_frames):
        t = index / max(1, motion.num_frames - 1)
        fx = motion.cross if start[0] is None else start[0] + (end[0] - start[0]) * t
        fy = motion.cross if start[1] is None else start[1] + (end[1] - start[1]) * t
        x0, y0 = fx * travel_x, fy * travel_y
        frame = Image.new("RGB", (motion.width, motion.height), BACKGROUNDS[motion.background])
        _draw_shape(ImageDraw.Draw(frame), motion.shape, (x0, y0, x0 + size, y0 + size),
                    COLOURS[motion.colour])
        yield np.asarray(frame)


@functools.lru_cache(maxsize=None)
def video_codec() -> str:
    """H.264 when the av wheel has libx264 (what real data uses), else MPEG-4 part 2."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_mp4(frames: Iterable[np.ndarray], width: int, height: int, fps: int) -> bytes:
    """yuv420p MP4 that both decord and PyAV decode; single-threaded for reproducible bytes."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(video_codec(), rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_count = 1
        if video_codec() == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "20"}
        else:
            stream.bit_rate = 400_000
        for array in frames:
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def _video_turns(motion: Motion, rng: random.Random) -> list[Turn]:
    seconds = motion.num_frames / motion.fps
    thing = f"{motion.colour} {motion.shape}"
    seen = (f"In the first frame the {motion.shape} is at one edge; "
            f"by the last frame it reaches the opposite edge.")
    return [
        Turn(f"Which direction does the {motion.colour} {motion.shape} move?",
             f"It moves {motion.direction}.", seen),
        Turn("What colour is the moving object?", f"It is {motion.colour}.",
             f"The only object that changes position is {motion.colour}."),
        Turn("What object moves in the video?", f"{_a(thing).capitalize()}.",
             f"One shape moves; it is {_a(thing)}."),
        Turn(rng.choice(("Describe the video.", "What happens in this video?")),
             motion.description(), f"The clip lasts {seconds:g} seconds. {seen}"),
    ]


def build_video_sample(rng: random.Random) -> SynthSample:
    """One short clip and one motion question."""
    motion = random_motion(rng)
    turn = rng.choice(_video_turns(motion, rng))
    turn = Turn(f"{VIDEO_PLACEHOLDER}\n{turn.question}", turn.answer, turn.reasoning)
    video = encode_mp4(render_motion(motion), motion.width, motion.height, motion.fps)
    return SynthSample(_conversation(rng, [turn], reasoning_prob=0.25), videos=[video])


# ---------------------------------------------------------------------------------------
# Code-reasoning text
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeTask:
    """A generated function, what it does, and how to draw inputs for it."""

    name: str
    source: str
    explanation: str
    make_input: Callable[[random.Random], Any]


FUNCTION_VERBS = ("compute", "get", "calc", "find", "make", "build", "eval")
FUNCTION_NOUNS = ("total", "value", "result", "answer", "score", "output", "thing")
VARIABLE_NAMES = ("acc", "res", "tmp", "cur", "val", "out", "agg")


def _int_list(rng: random.Random) -> list[int]:
    return [rng.randint(-9, 20) for _ in range(rng.randint(3, 6))]


def _sum_task(rng: random.Random, name: str, var: str) -> CodeTask:
    start, factor = rng.randint(0, 10), rng.randint(1, 4)
    source = (f"def {name}(xs):\n    {var} = {start}\n    for x in xs:\n"
              f"        {var} += x * {factor}\n    return {var}\n")
    explanation = (f"`{name}` starts `{var}` at {start}, adds every element of `xs` multiplied "
                   f"by {factor}, and returns the result, i.e. {start} + {factor} * sum(xs).")
    return CodeTask(name, source, explanation, _int_list)


def _factorial_task(rng: random.Random, name: str, var: str) -> CodeTask:
    source = (f"def {name}(n):\n    {var} = 1\n    for i in range(2, n + 1):\n"
              f"        {var} *= i\n    return {var}\n")
    explanation = (f"`{name}` multiplies `{var}` by every integer from 2 to n, so it returns "
                   f"n factorial (1 for n < 2).")
    return CodeTask(name, source, explanation, lambda r: r.randint(0, 8))


def _fibonacci_task(rng: random.Random, name: str, var: str) -> CodeTask:
    source = (f"def {name}(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
              f"        a, b = b, a + b\n    return a\n")
    explanation = (f"`{name}` keeps two consecutive Fibonacci numbers `a` and `b` and advances "
                   f"them n times, so it returns the n-th Fibonacci number (F(0) = 0).")
    return CodeTask(name, source, explanation, lambda r: r.randint(0, 12))


def _reverse_task(rng: random.Random, name: str, var: str) -> CodeTask:
    source = (f"def {name}(s):\n    {var} = \"\"\n    for ch in s:\n"
              f"        {var} = ch + {var}\n    return {var}\n")
    explanation = (f"`{name}` prepends each character of `s` to `{var}`, which builds the "
                   f"string backwards, so it returns `s` reversed.")
    return CodeTask(name, source, explanation, lambda r: r.choice(WORDS))


def _max_task(rng: random.Random, name: str, var: str) -> CodeTask:
    source = (f"def {name}(xs):\n    {var} = xs[0]\n    for x in xs[1:]:\n"
              f"        if x > {var}:\n            {var} = x\n    return {var}\n")
    explanation = (f"`{name}` keeps the largest element seen so far in `{var}`, starting from "
                   f"the first element, so it returns the maximum of `xs`.")
    return CodeTask(name, source, explanation, _int_list)


def _count_above_task(rng: random.Random, name: str, var: str) -> CodeTask:
    threshold = rng.randint(0, 10)
    source = (f"def {name}(xs):\n    {var} = 0\n    for x in xs:\n        if x > {threshold}:\n"
              f"            {var} += 1\n    return {var}\n")
    explanation = (f"`{name}` counts the elements of `xs` that are greater than {threshold} "
                   f"and returns that count.")
    return CodeTask(name, source, explanation, _int_list)


CODE_TEMPLATES: tuple[Callable[[random.Random, str, str], CodeTask], ...] = (
    _sum_task, _factorial_task, _fibonacci_task, _reverse_task, _max_task, _count_above_task,
)


def random_code_task(rng: random.Random) -> CodeTask:
    name = f"{rng.choice(FUNCTION_VERBS)}_{rng.choice(FUNCTION_NOUNS)}"
    return rng.choice(CODE_TEMPLATES)(rng, name, rng.choice(VARIABLE_NAMES))


def load_function(task: CodeTask) -> Callable[[Any], Any]:
    """Execute the generated source (our own templates) and return the function object."""
    namespace: dict[str, Any] = {}
    exec(compile(task.source, f"<synth:{task.name}>", "exec"), namespace)  # noqa: S102
    return namespace[task.name]


def trace_call(function: Callable[[Any], Any], argument: Any) -> tuple[Any, list[str]]:
    """Run `function(argument)` and record every local-variable change, in order.

    The reasoning text is built from the real execution, so it can never disagree with
    the answer.
    """
    steps: list[str] = []
    previous: dict[str, str] = {}

    def record_changes(frame: FrameType) -> None:
        for name, value in frame.f_locals.items():
            text = repr(value)
            if previous.get(name) != text:
                steps.append(f"`{name}` = {text}")
                previous[name] = text

    def local_tracer(frame: FrameType, event: str, _arg: Any) -> Callable | None:
        if event in ("line", "return"):
            record_changes(frame)
        return local_tracer

    def global_tracer(frame: FrameType, event: str, _arg: Any) -> Callable | None:
        return local_tracer if frame.f_code is function.__code__ else None

    old_tracer = sys.gettrace()
    sys.settrace(global_tracer)
    try:
        result = function(argument)
    finally:
        sys.settrace(old_tracer)
    return result, steps


def _traced_call(task: CodeTask, argument: Any) -> tuple[Any, str]:
    """The call's result and a step-by-step reasoning text taken from its execution."""
    result, steps = trace_call(load_function(task), argument)
    reasoning = (f"Let me trace `{task.name}({argument!r})` step by step.\n"
                 + "\n".join(f"- {step}" for step in steps)
                 + f"\nThe loop is done, so the function returns {result!r}.")
    return result, reasoning


def _return_turn(task: CodeTask, argument: Any, question: str) -> Turn:
    result, reasoning = _traced_call(task, argument)
    return Turn(question, f"It returns `{result!r}`.", reasoning)


def _explain_turn(task: CodeTask, argument: Any, question: str) -> Turn:
    result, reasoning = _traced_call(task, argument)
    example = f" For example, `{task.name}({argument!r})` returns `{result!r}`."
    return Turn(question, task.explanation + example, reasoning)


def _code_block(task: CodeTask) -> str:
    return f"```python\n{task.source}```\n"


def build_text_sample(rng: random.Random) -> SynthSample:
    """A generated function and questions about it; half the samples reason step by step."""
    task = random_code_task(rng)
    inputs = [task.make_input(rng) for _ in range(2)]
    ask_return = f"What does this function return for input {inputs[0]!r}?"
    if rng.random() < 0.7:
        turns = [_return_turn(task, inputs[0], _code_block(task) + ask_return)]
    else:
        turns = [_explain_turn(task, inputs[0], _code_block(task) + "Explain this code.")]
    if rng.random() < 0.25:
        follow_up = f"And what does it return for input {inputs[1]!r}?"
        turns.append(_return_turn(task, inputs[1], follow_up))
    return SynthSample(_conversation(rng, turns, reasoning_prob=0.5))


# ---------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------

SAMPLE_BUILDERS: dict[str, Callable[[random.Random], SynthSample]] = {
    "image": build_image_sample,
    "video": build_video_sample,
    "multi_image": build_multi_image_sample,
    "text": build_text_sample,
    "described_image": build_described_image_sample,
}


def build_sample(kind: str, seed: int, index: int) -> SynthSample:
    """Each sample has its own RNG (string seeds hash stably), so samples are independent."""
    return SAMPLE_BUILDERS[kind](random.Random(f"{kind}:{seed}:{index}"))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Fixed metadata, so the same content gives byte-identical tar files."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_sample(tar: tarfile.TarFile, key: str, sample: SynthSample, source: str) -> dict:
    record = {"messages": sample.messages, "source": source}
    _add_member(tar, f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
    for index, (extension, data) in enumerate(sample.images):
        _add_member(tar, f"{key}.img{index}.{extension}", data)
    for index, data in enumerate(sample.videos):
        _add_member(tar, f"{key}.vid{index}.mp4", data)
    return record


def write_synthetic_shards(out_dir: Path, kind: str, num: int, seed: int,
                           samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD) -> list[dict]:
    """Write `num` samples of `kind` as `out_dir/shard-NNNNNN.tar`; returns the JSON records."""
    if kind not in SAMPLE_BUILDERS:
        raise ValueError(f"unknown kind {kind!r}: set one of {', '.join(KINDS)}")
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = f"synth_{kind}"
    records = []
    for shard_start in range(0, num, samples_per_shard):
        shard_path = out_dir / f"shard-{shard_start // samples_per_shard:06d}.tar"
        with tarfile.open(shard_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(shard_start, min(num, shard_start + samples_per_shard)):
                key = f"{source}-{seed}-{index:06d}"
                records.append(_write_sample(tar, key, build_sample(kind, seed, index), source))
    return records


# ---------------------------------------------------------------------------------------
# Embedded data for smoke runs
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedData:
    root: Path
    shard_dirs: dict[str, Path]  # kind -> directory of .tar shards
    described_dir: Path  # the image scenes as text: the smoke LM's pre-training data (train.loop.embedded_lm)
    tokenizer_dir: Path
    heldout_dirs: dict[str, Path]  # kind -> held-out shards (never trained on)
    monitor_dir: Path  # held-out code-reasoning text of the smoke forgetting monitor (never trained on)


def _embedded_layout(root: Path) -> EmbeddedData:
    return EmbeddedData(root, {kind: root / kind for kind in KINDS}, root / "described_image", root / "tokenizer",
                        {kind: root / "heldout" / kind for kind in KINDS}, root / "heldout" / "monitor")


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Serialises generation across processes (e.g. torchrun ranks on one host)."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / "COMPLETE").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _conversation_texts(records: Iterable[dict]) -> Iterator[str]:
    for record in records:
        yield "\n".join(f"{m['role']}\n{m['content']}" for m in record["messages"])


def _generate_embedded(staging: Path, num_per_kind: dict[str, int], seed: int,
                       vocab_size: int) -> list[dict]:
    """Write every kind and the tokenizer into `staging`; returns all records."""
    layout = _embedded_layout(staging)
    records: list[dict] = []
    for kind in KINDS:
        start = time.perf_counter()
        kind_records = write_synthetic_shards(layout.shard_dirs[kind], kind,
                                              num_per_kind[kind], seed)
        records.extend(kind_records)
        print(f"[synth] {kind}: {len(kind_records)} samples "
              f"({time.perf_counter() - start:.1f}s)", flush=True)
    start = time.perf_counter()
    # Other seeds than the image shards': other scenes, so the LM is not pre-trained on Stage 0's answers.
    write_synthetic_shards(layout.described_dir, "described_image", DESCRIBED_NUM, seed + DESCRIBED_SEED_OFFSET)
    print(f"[synth] described_image: {DESCRIBED_NUM} samples ({time.perf_counter() - start:.1f}s)", flush=True)
    start = time.perf_counter()
    for kind in KINDS:  # held out: neither trained on nor seen by the tokenizer
        write_synthetic_shards(layout.heldout_dirs[kind], kind, HELDOUT_NUM_PER_KIND[kind], seed + HELDOUT_SEED_OFFSET)
    write_synthetic_shards(layout.monitor_dir, "text", MONITOR_NUM, seed + MONITOR_SEED_OFFSET)
    print(f"[synth] held-out: {sum(HELDOUT_NUM_PER_KIND.values())} samples, monitor: {MONITOR_NUM} "
          f"({time.perf_counter() - start:.1f}s)", flush=True)
    start = time.perf_counter()
    train_tokenizer(_conversation_texts(records), layout.tokenizer_dir, vocab_size)
    print(f"[synth] tokenizer: vocab {vocab_size} ({time.perf_counter() - start:.1f}s)", flush=True)
    return records


def _clear_stale(root: Path) -> None:
    """Remove an old embedded dataset, but never a directory we did not create."""
    if not root.exists():
        return
    if (root / "COMPLETE").exists():
        shutil.rmtree(root)
    elif not any(root.iterdir()):
        root.rmdir()
    else:
        raise FileExistsError(
            f"{root} exists and is not embedded data: set another root or remove it")


def ensure_embedded_data(root: Path, num_per_kind: dict[str, int] | None = None, seed: int = 0,
                         vocab_size: int = 1024) -> EmbeddedData:
    """Generate the embedded shards and tokenizer under `root` once; later calls reuse them.

    Generation happens in a staging directory renamed into place with the `COMPLETE`
    marker inside, so a crash never leaves a half dataset that looks complete.
    """
    root = Path(root)
    counts = {**DEFAULT_NUM_PER_KIND, **(num_per_kind or {})}
    arguments = {"num_per_kind": counts, "seed": seed, "vocab_size": vocab_size,
                 "version": SYNTH_VERSION}
    root.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root.parent / f".{root.name}.lock"):
        if _read_marker(root) == arguments:
            return _embedded_layout(root)
        print(f"[synth] generating embedded data in {root}", flush=True)
        # Under the lock nobody else is generating: a leftover staging dir is from a crash.
        staging = root.parent / f".{root.name}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        _generate_embedded(staging, counts, seed, vocab_size)
        (staging / "COMPLETE").write_text(json.dumps(arguments, indent=2) + "\n", encoding="utf-8")
        _clear_stale(root)
        staging.rename(root)
    return _embedded_layout(root)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write synthetic webdataset shards.")
    parser.add_argument("--out", type=Path, required=True, help="directory for shard-*.tar")
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--num", type=int, required=True, help="number of samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    start = time.perf_counter()
    records = write_synthetic_shards(args.out, args.kind, args.num, args.seed,
                                     args.samples_per_shard)
    print(f"[synth] wrote {len(records)} {args.kind} samples to {args.out} "
          f"({time.perf_counter() - start:.1f}s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
