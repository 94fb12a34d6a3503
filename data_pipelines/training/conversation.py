"""Conversations -> token ids + labels, with media placeholders expanded to media tokens.

The format is ChatML (`<|im_start|>role\\n ... <|im_end|>\\n`), the format of the tokenizers this
project trains and of the released Nemotron Nano V2 tokenizer. Loss falls on assistant turns only
(their content and closing `<|im_end|>`); everything else is labelled -100.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from data_pipelines.training import special_tokens as st
from data_pipelines.training.evs import provisional_frame_counts

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_PLACEHOLDER = re.compile(f"({re.escape(st.IMAGE_PLACEHOLDER)}|{re.escape(st.VIDEO_PLACEHOLDER)})")


class SampleError(ValueError):
    """A sample that must be skipped; `reason` is the skip-counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class MediaSlot:
    """What one placeholder expands to: `tokens_per_item` context tokens for each item (tile or
    frame), and for videos a text label before each frame.

    `kept_tokens` (videos under EVS): context tokens the whole video keeps after pruning; frames
    get a provisional split of them (`data_pipelines.training.evs.provisional_frame_counts`) that the
    model rewrites to the real one. None: every frame keeps `tokens_per_item`.
    """

    kind: str  # "image" | "video"
    num_items: int
    tokens_per_item: int
    frame_labels: tuple[str, ...] = ()
    kept_tokens: int | None = None

    @property
    def context_tokens(self) -> int:
        return self.tokens_per_item * self.num_items if self.kept_tokens is None else self.kept_tokens


def content_text(content: Any) -> Any:
    """String content as is; a list of HF chat parts (`{"type": "text", "text": ...}`, `{"type":
    "image"}`, `{"type": "video"}`) -> text with placeholders, parts joined by newlines."""
    if not isinstance(content, list):
        return content
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in ("image", "video"):
            pieces.append(st.IMAGE_PLACEHOLDER if kind == "image" else st.VIDEO_PLACEHOLDER)
        else:
            raise SampleError("malformed_json", f"content part of unknown type {kind!r}")
    return "\n".join(pieces)


def _is_utf8_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_messages(doc: dict) -> list[Message]:
    """Validate the JSON schema; raises SampleError with a counted reason. Content may be a string
    or a list of HF chat parts (see `content_text`), as the converter accepts."""
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SampleError("empty_conversation")
    parsed = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            m = {**m, "content": content_text(m["content"])}
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise SampleError("malformed_json", "message without string content")
        if m.get("role") not in ROLES:
            raise SampleError("bad_role", str(m.get("role")))
        if not _is_utf8_text(m["content"]):
            raise SampleError("bad_text", "message content holds a lone UTF-16 surrogate (valid JSON, not text)")
        parsed.append(Message(m["role"], m["content"]))
    if not any(m.role == "assistant" and m.content.strip() for m in parsed):
        raise SampleError("empty_conversation", "no assistant answer")
    turns = [m for m in parsed if m.role != "system"]
    if turns[0].role != "user":  # the model would learn to answer a question it never saw
        raise SampleError("assistant_first", "the first turn after the system prompt is the assistant's")
    if any(m.role == "assistant" and not m.content.strip() for m in turns):
        raise SampleError("empty_turn", "an assistant turn is empty (it would teach the model to answer nothing)")
    return parsed


def placeholder_order(messages: Sequence[Message]) -> list[str]:
    """Kinds ("image" | "video") of the media placeholders in user turns, in order."""
    return [
        "image" if p == st.IMAGE_PLACEHOLDER else "video"
        for m in messages if m.role == "user" for p in _PLACEHOLDER.findall(m.content)
    ]


def apply_reasoning_mode(messages: list[Message], reasoning_on_ratio: float, rng: random.Random) -> list[Message]:
    """Make the reasoning mode explicit: `/think` or `/no_think` in the system prompt, and an empty
    `<think></think>` at the start of every answer when reasoning is off.

    A conversation without a marker gets reasoning on with probability `reasoning_on_ratio`; one
    whose answers already carry a non-empty think block is reasoning-on regardless.
    """
    system = next((m for m in messages if m.role == "system"), None)
    text = system.content if system else ""
    if st.REASONING_OFF in text:
        reasoning_on = False
    elif st.REASONING_ON in text:
        reasoning_on = True
    else:
        has_thoughts = any(m.role == "assistant" and _has_nonempty_think(m.content) for m in messages)
        reasoning_on = has_thoughts or rng.random() < reasoning_on_ratio
        marker = st.REASONING_ON if reasoning_on else st.REASONING_OFF
        new_system = Message("system", f"{text}\n{marker}".strip())
        messages = [new_system] + [m for m in messages if m is not system]
    if reasoning_on:
        return messages
    empty = f"{st.THINK_OPEN}{st.THINK_CLOSE}"
    return [
        Message(m.role, m.content if m.content.lstrip().startswith(st.THINK_OPEN) else empty + m.content)
        if m.role == "assistant" else m
        for m in messages
    ]


def _has_nonempty_think(content: str) -> bool:
    stripped = content.lstrip()
    if not stripped.startswith(st.THINK_OPEN):
        return False
    inner = stripped[len(st.THINK_OPEN):].split(st.THINK_CLOSE, 1)[0]
    return bool(inner.strip())


# A rendered piece of the conversation and whether its tokens carry loss.
Segment = tuple[str, bool]
TemplateFn = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text


def builtin_segments(messages: Sequence[Message]) -> list[Segment]:
    """The built-in ChatML rendering: loss on assistant content and its closing `<|im_end|>`."""
    segments: list[Segment] = []
    for m in messages:
        supervised = m.role == "assistant"
        segments += [(f"{st.IM_START}{m.role}\n", False), (m.content, supervised), (st.IM_END, supervised),
                     ("\n", False)]
    return segments


def template_segments(messages: Sequence[Message], template: TemplateFn) -> list[Segment] | None:
    """Segments from the tokenizer's own chat template, found by rendering growing prefixes.

    Turn i is what rendering messages[:i+1] adds to messages[:i]; an assistant turn's header is
    what `add_generation_prompt` adds. Returns None when the template is not prefix-stable (some
    templates rewrite earlier turns, e.g. dropping old thoughts): the caller falls back to the
    built-in rendering rather than guess which tokens are the answer.
    """
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    segments: list[Segment] = []
    previous = ""
    for i, message in enumerate(messages):
        rendered = template(dicts[:i + 1], False)
        if not rendered.startswith(previous):
            return None
        turn = rendered[len(previous):]
        if message.role == "assistant":
            header = template(dicts[:i], True)[len(previous):]
            if not turn.startswith(header):
                return None
            body = turn[len(header):]
            answer = body.rstrip()  # trailing newline after the end marker carries no loss
            segments += [(header, False), (answer, True), (body[len(answer):], False)]
        else:
            segments.append((turn, False))
        previous = rendered
    return segments


def tokenize_conversation(
    messages: Sequence[Message],
    media: Sequence[MediaSlot],
    encode: Callable[[str], list[int]],
    special_ids: dict[str, int],
    template: TemplateFn | None = None,
    loss_on_think: bool = True,
) -> tuple[list[int], list[int]]:
    """Render and tokenize; returns (input_ids, labels) of equal length.

    Uses the tokenizer's chat template when given and prefix-stable, else the built-in one.
    `media[k]` is what the k-th placeholder (over all user turns, in order) expands to. With
    `loss_on_think=False` the `<think>...</think>` block of each answer carries no loss.
    """
    ids, labels, _ = tokenize_with_media_spans(messages, media, encode, special_ids, template, loss_on_think)
    return ids, labels


def tokenize_with_media_spans(
    messages: Sequence[Message],
    media: Sequence[MediaSlot],
    encode: Callable[[str], list[int]],
    special_ids: dict[str, int],
    template: TemplateFn | None = None,
    loss_on_think: bool = True,
    segments: list[Segment] | None = None,
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """`tokenize_conversation` plus (start, length) of each media slot's tokens, in slot order.
    `segments`: the template's rendering when the caller already has it (`template_segments`)."""
    segments = (segments or (template_segments(messages, template) if template is not None else None)
                or builtin_segments(messages))
    ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    media_iter = iter(media)
    for text, supervised in segments:
        for part, part_supervised in _split_think(text, supervised and not loss_on_think):
            for piece in _PLACEHOLDER.split(part) if not supervised else [part]:
                if piece in (st.IMAGE_PLACEHOLDER, st.VIDEO_PLACEHOLDER):
                    tokens, carries_loss = _media_tokens(next(media_iter), encode, special_ids), False
                    spans.append((len(ids), len(tokens)))
                elif piece:
                    tokens, carries_loss = encode(piece), supervised and part_supervised
                else:
                    continue
                ids.extend(tokens)
                labels.extend(tokens if carries_loss else [IGNORE_INDEX] * len(tokens))
    return ids, labels, spans


_THINK_BLOCK = re.compile(f"({re.escape(st.THINK_OPEN)}.*?{re.escape(st.THINK_CLOSE)})", re.DOTALL)


def _split_think(text: str, mask_think: bool) -> list[tuple[str, bool]]:
    """[(piece, carries_loss_if_supervised)]: think blocks marked False when masked."""
    if not mask_think:
        return [(text, True)]
    return [(piece, not _THINK_BLOCK.fullmatch(piece)) for piece in _THINK_BLOCK.split(text) if piece]


def _media_tokens(slot: MediaSlot, encode: Callable[[str], list[int]], special_ids: dict[str, int]) -> list[int]:
    def block(num_context: int) -> list[int]:
        return [special_ids[st.IMG_START]] + [special_ids[st.IMG_CONTEXT]] * num_context + [special_ids[st.IMG_END]]

    if slot.kind == "image":
        # All tiles of one image (thumbnail last) share one block.
        return block(slot.tokens_per_item * slot.num_items)
    counts = ([slot.tokens_per_item] * len(slot.frame_labels) if slot.kept_tokens is None
              else provisional_frame_counts(len(slot.frame_labels), slot.tokens_per_item, slot.kept_tokens))
    tokens: list[int] = []
    for label, count in zip(slot.frame_labels, counts):
        tokens += encode(label) + block(count)
    return tokens


def media_token_count(slot: MediaSlot, encode: Callable[[str], list[int]]) -> int:
    """Tokens a placeholder expands to, without building them (for the token budget)."""
    if slot.kind == "image":
        return slot.tokens_per_item * slot.num_items + 2
    return sum(len(encode(label)) for label in slot.frame_labels) + 2 * slot.num_items + slot.context_tokens


def frame_label(index: int, timestamp: float) -> str:
    """Text before each video frame, giving the model the frame's time; frames after the first
    start on a new line, as the released Nemotron Nano V2 VL processor writes them."""
    return f"{chr(10) if index else ''}Frame {index + 1} sampled at {timestamp:.2f} seconds: "
