"""This project's vision-language model as a model of EleutherAI's lm-eval harness (`hybrid-vl`).

The harness hands a multimodal `generate_until` request as (context, generation kwargs,
{"visual": [PIL images]}), the context holding one `<image>` per image (the harness's own
placeholder, which is also training's). Each request is prompted exactly as `train.chat` prompts
(`build_prompt`: training's chat template, InternVL tiling + thumbnail, `/think` or `/no_think`,
the empty think pair of reasoning-off answers), so the model sees the layout it was trained on.
Requests are decoded together, up to `batch_size` rows (`greedy_batch`): each prompt is prefilled
alone and the rows keep their own lengths, so none is padded (a Mamba state cannot skip padding).

The answer handed back to the task is the text after the think block (the task's own answer
extraction and metric then run unchanged), cut at the task's stop strings.

Registered on import: `import train.evaluate.vlm_model` then `lm_eval.simple_evaluate(model="hybrid-vl",
model_args={"pretrained": RUN_DIR}, ...)`, or `python -m train.evaluate --ckpt RUN --vlm-tasks ...`.
Besides "visual", a request may carry "video": [encoded video bytes] (training's frame sampling
and frame labels apply; its `<video>` placeholders mark them).
"""

from __future__ import annotations

import io
import re
from collections import defaultdict

import torch
from tqdm import tqdm
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from data_pipelines.training import special_tokens as st
from train.chat.generate import greedy_batch
from train.chat.session import ChatModel, build_prompt, load_chat_model

MODEL_NAME = "hybrid-vl"
# A closed think block, or an unclosed one running to the end (the length cap hit mid-thought).
_THINK = re.compile(re.escape(st.THINK_OPEN) + r".*?(?:" + re.escape(st.THINK_CLOSE) + r"|$)", re.DOTALL)


def image_bytes(image) -> bytes:
    """A harness image (PIL, or already encoded bytes) as PNG bytes for training's decoder (lossless)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def answer_text(generated: str, until: list[str]) -> str:
    """The answer a task scores: the think block removed, cut at the first stop string."""
    text = _THINK.sub("", generated)
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text.strip()


@register_model(MODEL_NAME)
class HybridVLM(LM):
    """model_args: pretrained (run dir, checkpoints dir or step dir), tokenizer (default: the run's
    data.tokenizer), think (reasoning mode on; default off), max_gen_toks (a cap on every task's
    answer length; default: each task's own), device, batch_size."""

    MULTIMODAL = True

    def __init__(self, pretrained: str | None = None, tokenizer: str | None = None, think: bool | str = False,
                 max_gen_toks: int | str | None = None, device: str | None = "cpu", batch_size: int | str | None = 1,
                 chat: ChatModel | None = None, **_harness_extras):
        super().__init__()
        if chat is None:
            if not pretrained:
                raise ValueError(f"{MODEL_NAME}: give model_args pretrained=RUN_DIR (a native run or checkpoint)")
            chat = load_chat_model(pretrained, tokenizer, device=device or "cpu")
        self.chat = chat
        self.think = str(think).lower() in ("1", "true", "yes", "on")
        self.max_gen_toks = int(max_gen_toks) if max_gen_toks not in (None, "", "none", "None") else None
        self.batch_size = max(1, int(batch_size)) if str(batch_size).isdigit() else 1  # "auto": one at a time
        special = chat.tokenizer.special_ids
        self.stop_ids = [special[st.IM_END], special[st.EOS]]
        self._device = next(chat.model.parameters()).device

    @classmethod
    def from_chat(cls, chat: ChatModel, **options) -> "HybridVLM":
        """Wrap a model already loaded (the stage-end benchmarks reuse nothing else)."""
        return cls(chat=chat, **options)

    # -------------------------------------------------------------- generation

    def prompt(self, context: str, visuals: dict) -> tuple[list[int], torch.Tensor]:
        """(token ids, uint8 tiles) of one request, laid out as training lays a sample out."""
        images = [image_bytes(image) for image in visuals.get("visual") or []]
        videos = list(visuals.get("video") or [])
        return build_prompt(context, images, videos, self.think, "", self.chat.cfg, self.chat.tokenizer)

    def generate_batch(self, prompts: list[tuple[list[int], torch.Tensor]], max_new_tokens: int) -> list[str]:
        """Greedy answers (raw text, think block included) of prompts decoded together."""
        with torch.no_grad():
            embeds = [self.chat.model.embed_inputs(torch.tensor([ids], device=self._device), tiles.to(self._device))
                      for ids, tiles in prompts]  # each (1, L_i, D)
            rows = greedy_batch(self.chat.model.language_model, embeds, max_new_tokens, self.stop_ids)
        return [self.chat.tokenizer.hf.decode(tokens, skip_special_tokens=False) for tokens in rows]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prepared = []
        for request in requests:
            context, gen_kwargs, *rest = request.args
            visuals = rest[0] if rest else {}
            limit = int(gen_kwargs.get("max_gen_toks", 256))
            if self.max_gen_toks is not None:
                limit = min(limit, self.max_gen_toks)
            until = gen_kwargs.get("until") or []
            prepared.append((self.prompt(context, visuals), limit, [until] if isinstance(until, str) else list(until)))
        # Batches: same answer cap, at most batch_size rows each, prompts of similar length together
        # (a decode step attends over the batch's longest row).
        groups: dict[int, list[int]] = defaultdict(list)
        for i in sorted(range(len(prepared)), key=lambda i: len(prepared[i][0][0])):
            groups[prepared[i][1]].append(i)
        answers: list[str | None] = [None] * len(prepared)
        progress = tqdm(total=len(prepared), desc=MODEL_NAME, disable=disable_tqdm)
        for limit, members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                for i, text in zip(chunk, self.generate_batch([prepared[i][0] for i in chunk], limit)):
                    answers[i] = answer_text(text, prepared[i][2])
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], answers[i])
                progress.update(len(chunk))
        progress.close()
        return answers

    # -------------------------------------------------------------- not served here

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(f"{MODEL_NAME} answers generate_until tasks; run multiple-choice (loglikelihood) "
                                  "tasks with --tasks, on the exported language model")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(f"{MODEL_NAME} answers generate_until tasks; run perplexity tasks with --tasks")
