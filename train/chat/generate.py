"""Greedy decoding over the language model's own inference caches.

The model does the work: `HybridLanguageModel.prefill` runs the prompt once through every layer,
each mixer keeping what decoding needs in its cache (Mamba: the conv window and the SSM state;
attention: keys and values), and `decode_step` advances every cache by one token. This module only
chooses tokens. Prompt embeddings (with images and videos spliced in) come from
`VisionLanguageModel.embed_inputs`, the same path training uses.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor

from train.model.language_model import HybridLanguageModel, stack_caches

__all__ = ["greedy_batch", "greedy_tokens"]


def greedy_tokens(lm: HybridLanguageModel, embeds: Tensor, max_new_tokens: int,
                  stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yields the greedy continuation of one prompt (embeds (1, L, D)) token by token, as soon as
    each is chosen; ends after `max_new_tokens` or at a stop token (which is not yielded)."""
    if embeds.shape[0] != 1:
        raise ValueError(f"greedy_tokens generates for one prompt, got a batch of {embeds.shape[0]}")
    stop = set(stop_ids)
    if max_new_tokens <= 0:
        return
    # The last chosen token is never fed back, so the cache needs L + max_new_tokens - 1 positions.
    logits, cache = lm.prefill(embeds, embeds.shape[1] + max_new_tokens - 1)
    for i in range(max_new_tokens):
        token = logits.argmax(dim=-1)  # (1,)
        if int(token) in stop:
            return
        yield int(token)
        if i + 1 < max_new_tokens:
            logits = lm.decode_step(token, cache)


def greedy_batch(lm: HybridLanguageModel, prompts: list[Tensor], max_new_tokens: int,
                 stop_ids: Iterable[int] = ()) -> list[list[int]]:
    """The greedy continuations of several prompts (each embeds (1, L_i, D), lengths may differ)
    decoded together: each prompt is prefilled alone, their caches stacked (`stack_caches`: every row
    keeps its own length, nothing is padded), then one decode step per token for the whole batch,
    each row ending at its first stop token (not included) or after `max_new_tokens`. Every row is
    what `greedy_tokens` gives its prompt alone."""
    stop = set(stop_ids)
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0 or not prompts:
        return out
    capacity = max(p.shape[1] for p in prompts) + max_new_tokens - 1
    prefilled = [lm.prefill(p, capacity) for p in prompts]
    logits = torch.cat([logit for logit, _ in prefilled])  # (B, V)
    cache = stack_caches([c for _, c in prefilled])
    done = [False] * len(prompts)
    for i in range(max_new_tokens):
        tokens = logits.argmax(dim=-1)  # (B,)
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                if token in stop:
                    done[row] = True
                else:
                    out[row].append(token)
        if all(done) or i + 1 == max_new_tokens:
            break
        logits = lm.decode_step(tokens, cache)  # finished rows keep decoding; their tokens are ignored
    return out
