from __future__ import annotations

import random

import pytest

from data_pipelines import special_tokens as st
from data_pipelines.conversation import (
    IGNORE_INDEX, MediaSlot, Message, SampleError, apply_reasoning_mode, frame_label, media_token_count,
    parse_messages, placeholder_order, tokenize_conversation,
)


def test_parse_rejects_bad_roles_and_empty():
    with pytest.raises(SampleError) as err:
        parse_messages({"messages": []})
    assert err.value.reason == "empty_conversation"
    with pytest.raises(SampleError) as err:
        parse_messages({"messages": [{"role": "robot", "content": "x"}]})
    assert err.value.reason == "bad_role"
    with pytest.raises(SampleError) as err:
        parse_messages({"messages": [{"role": "user", "content": "only a question"}]})
    assert err.value.reason == "empty_conversation"


def test_placeholder_order_over_turns():
    msgs = [Message("user", "<image> and <video>"), Message("assistant", "ok"), Message("user", "<image>")]
    assert placeholder_order(msgs) == ["image", "video", "image"]


def test_reasoning_off_adds_empty_think_and_marker():
    msgs = [Message("user", "hi"), Message("assistant", "hello")]
    out = apply_reasoning_mode(msgs, 0.0, random.Random(0))
    assert out[0].role == "system" and st.REASONING_OFF in out[0].content
    assert out[-1].content == "<think></think>hello"


def test_reasoning_on_by_ratio_and_by_existing_thoughts():
    msgs = [Message("user", "hi"), Message("assistant", "hello")]
    out = apply_reasoning_mode(msgs, 1.0, random.Random(0))
    assert st.REASONING_ON in out[0].content and out[-1].content == "hello"
    thought = [Message("user", "hi"), Message("assistant", "<think>because</think>hello")]
    assert st.REASONING_ON in apply_reasoning_mode(thought, 0.0, random.Random(0))[0].content


def test_explicit_no_think_keeps_system_and_existing_empty_think():
    msgs = [Message("system", "Be brief. /no_think"), Message("user", "q"), Message("assistant", "<think></think>a")]
    assert apply_reasoning_mode(msgs, 1.0, random.Random(0)) == msgs


def test_labels_cover_assistant_turns_only(tokenizer):
    msgs = [Message("system", "/no_think"), Message("user", "What? <image>"), Message("assistant", "A red circle."),
            Message("user", "And?"), Message("assistant", "Nothing.")]
    slots = [MediaSlot("image", 3, 4)]
    ids, labels = tokenize_conversation(msgs, slots, tokenizer.encode, tokenizer.special_ids)
    assert len(ids) == len(labels)
    ctx = tokenizer.special_ids[st.IMG_CONTEXT]
    assert ids.count(ctx) == 12
    supervised = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tokenizer.hf.decode(supervised) == "A red circle.<|im_end|>Nothing.<|im_end|>"
    assert all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t == ctx)


def test_video_slot_has_frame_labels_and_counts(tokenizer):
    labels = tuple(frame_label(i, t) for i, t in enumerate([0.0, 0.5, 1.0]))
    slot = MediaSlot("video", 3, 4, labels)
    msgs = [Message("user", "<video> Where?"), Message("assistant", "Left.")]
    ids, _ = tokenize_conversation(msgs, [slot], tokenizer.encode, tokenizer.special_ids)
    text = tokenizer.hf.decode(ids)
    assert "Frame 2 sampled at 0.50 seconds: " in text
    assert ids.count(tokenizer.special_ids[st.IMG_START]) == 3
    empty, _ = tokenize_conversation(msgs, [MediaSlot("video", 0, 4)], tokenizer.encode, tokenizer.special_ids)
    assert len(ids) - len(empty) == media_token_count(slot, tokenizer.encode)
