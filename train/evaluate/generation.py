"""Answer accuracy of the vision-language model on held-out shards, with cached greedy generation.

Each sample's conversation (an optional system prompt, one user turn with its images / videos,
the assistant's answer) is prompted exactly as `train.chat` prompts it (training's layout), the
model generates greedily until the end of its turn, and the answer is scored against the
sample's: exact match (after stripping whitespace and any think block) and relaxed match
(case, spacing and trailing punctuation ignored; numbers within 5%, as ChartQA's relaxed
accuracy). Samples that are not one question and one answer, or whose media fail to decode, are
counted skips per reason.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from data_pipelines.training import special_tokens as st
from data_pipelines.training.config import SourceConfig
from data_pipelines.training.decode import MediaDecodeError
from data_pipelines.training.conversation import SampleError, parse_messages
from data_pipelines.training.samples import IMAGE_SUFFIXES, VIDEO_SUFFIXES, media_members
from data_pipelines.training.shards import RawSample, expand_shard_paths, iter_shard, parse_json_member
from train.chat.session import ChatModel, build_prompt
from train.chat.generate import greedy_tokens

_THINK = re.compile(re.escape(st.THINK_OPEN) + r".*?" + re.escape(st.THINK_CLOSE), re.DOTALL)
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")


def strip_answer(text: str) -> str:
    return _THINK.sub("", text).strip()


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", strip_answer(text).lower()).strip().rstrip(".!?;:,").strip()


def relaxed_match(prediction: str, reference: str) -> bool:
    pred, ref = normalise(prediction), normalise(reference)
    if _NUMBER.match(pred) and _NUMBER.match(ref):
        target = float(ref)
        return math.isclose(float(pred), target, rel_tol=0.05) if target else float(pred) == 0.0
    return pred == ref


@dataclass
class SourceScore:
    name: str
    samples: int = 0
    exact: int = 0
    relaxed: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)  # the first few, for a look

    def as_dict(self) -> dict:
        n = max(self.samples, 1)
        return {"samples": self.samples, "exact_match": self.exact / n if self.samples else None,
                "relaxed_match": self.relaxed / n if self.samples else None, "skipped": dict(self.skipped),
                "examples": self.examples}


def question_and_answer(raw: RawSample) -> tuple[str, str, str, list[bytes], list[bytes]] | str:
    """(system, question, answer, images, videos) of a one-question sample, or a skip reason. Parsed
    by training's own parser (same reasons, BOM and content parts accepted)."""
    try:
        messages = parse_messages(parse_json_member(raw))
    except SampleError as err:
        return err.reason
    except ValueError as err:  # parse_json_member: missing_json / malformed_json
        return str(err)
    system = messages[0].content if messages[0].role == "system" else ""
    turns = messages[1:] if system else messages
    if [m.role for m in turns] != ["user", "assistant"]:
        return "not_single_turn"
    images = [raw.members[name] for name in media_members(raw, "img", IMAGE_SUFFIXES)]
    videos = [raw.members[name] for name in media_members(raw, "vid", VIDEO_SUFFIXES)]
    return system, turns[0].content, turns[1].content, images, videos


def score_source(chat: ChatModel, source: SourceConfig, max_samples: int, max_new_tokens: int = 64,
                 keep_examples: int = 3) -> SourceScore:
    score = SourceScore(source.name)
    special = chat.tokenizer.special_ids
    stops = [special[st.IM_END], special[st.EOS]]
    done = 0
    for shard in expand_shard_paths(source.path):
        for raw in iter_shard(shard):
            if done == max_samples:
                return score
            done += 1
            parsed = question_and_answer(raw)
            if isinstance(parsed, str):
                score.skipped[parsed] += 1
                continue
            system, question, answer, images, videos = parsed
            think = st.REASONING_ON in system
            try:
                ids, tiles = build_prompt(question, images, videos, think, system, chat.cfg, chat.tokenizer)
            except MediaDecodeError as err:
                score.skipped[err.reason] += 1
                continue
            except ValueError:  # placeholders that do not match the media
                score.skipped["placeholder_mismatch"] += 1
                continue
            with torch.no_grad():
                embeds = chat.model.embed_inputs(torch.tensor([ids]), tiles)
                tokens = list(greedy_tokens(chat.model.language_model, embeds, max_new_tokens, stops))
            prediction = chat.tokenizer.hf.decode(tokens, skip_special_tokens=False)
            score.samples += 1
            score.exact += strip_answer(prediction) == strip_answer(answer)
            score.relaxed += relaxed_match(prediction, answer)
            if len(score.examples) < keep_examples:
                score.examples.append({"key": raw.key, "question": question, "answer": answer,
                                       "prediction": prediction})
    return score
