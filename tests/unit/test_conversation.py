from __future__ import annotations

import random

import pytest

from data_pipelines.training import special_tokens as st
from data_pipelines.training.conversation import (
    IGNORE_INDEX,
    MediaSlot,
    Message,
    SampleError,
    apply_reasoning_mode,
    frame_label,
    media_token_count,
    parse_messages,
    placeholder_order,
    tokenize_conversation,
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


def test_tokenizer_template_matches_builtin_chatml(tokenizer):
    msgs = [Message("system", "/think"), Message("user", "Q1 <image>"), Message("assistant", "<think>hm</think>A1"),
            Message("user", "Q2"), Message("assistant", "A2")]
    slots = [MediaSlot("image", 2, 3)]
    builtin = tokenize_conversation(msgs, slots, tokenizer.encode, tokenizer.special_ids)
    own = tokenize_conversation(msgs, slots, tokenizer.encode, tokenizer.special_ids, tokenizer.template("auto"))
    assert tokenizer.template("auto") is not None
    assert own == builtin


def test_template_that_rewrites_history_falls_back_to_builtin(tokenizer):
    # Drops earlier assistant turns' thoughts, as some reasoning templates do: not prefix-stable.
    def rewriting(messages, add_generation_prompt):
        last = len(messages) - 1
        text = "".join(f"[{m['role']}]{m['content'] if i == last else m['content'].replace('<think>hm</think>', '')}"
                       for i, m in enumerate(messages))
        return text + ("[assistant]" if add_generation_prompt else "")

    msgs = [Message("user", "Q1"), Message("assistant", "<think>hm</think>A1"), Message("user", "Q2"),
            Message("assistant", "A2")]
    assert tokenize_conversation(msgs, [], tokenizer.encode, tokenizer.special_ids, rewriting) == \
        tokenize_conversation(msgs, [], tokenizer.encode, tokenizer.special_ids)


def test_loss_on_think_off_masks_the_think_block(tokenizer):
    msgs = [Message("user", "Q"), Message("assistant", "<think>step one</think>Answer.")]
    ids, labels = tokenize_conversation(msgs, [], tokenizer.encode, tokenizer.special_ids, loss_on_think=False)
    supervised = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tokenizer.hf.decode(supervised) == "Answer.<|im_end|>"
    ids, labels = tokenize_conversation(msgs, [], tokenizer.encode, tokenizer.special_ids, loss_on_think=True)
    assert tokenizer.hf.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX]).startswith("<think>step one")
