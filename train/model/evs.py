"""Efficient video sampling (EVS), model side: keep a video's most changed tokens.

After the ViT and projector, token (t, p) of a video scores 1 - cos(x[t, p], x[t - 1, p]): how
much that position changed since the previous frame. Frame 0 has no previous frame and scores
+inf, so it is always kept whole; the video keeps its global top `kept` tokens (the count the
data side planned, `data_pipelines.training.evs.kept_token_count`) in their original frame-major order.

The sample lays a video out as the served model sees it (per frame: label, `<img>`, that
frame's kept tokens, `</img>`), but how many tokens each frame keeps is only known here, so the
data side writes a provisional split of the same total and `relayout_video_span` moves the
frame labels and markers to the real split. The span's length never changes, so packing,
positions and sample boundaries stay as planned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def evs_dissimilarity(video_tokens: Tensor) -> Tensor:
    """(T, P, D) -> (T, P) fp32: 1 - cosine similarity with the same position one frame earlier;
    +inf on frame 0. Scored in fp32 so bf16 rounding does not turn near-ties into order flips."""
    x = video_tokens.float()
    changed = 1.0 - F.cosine_similarity(x[1:], x[:-1], dim=-1)  # (T - 1, P)
    first = torch.full_like(x[:1, :, 0], float("inf"))  # (1, P)
    return torch.cat([first, changed])


def evs_keep_mask(video_tokens: Tensor, kept: int) -> Tensor:
    """(T, P, D) tokens -> (T, P) bool mask of the `kept` most changed tokens.

    A stable descending sort breaks ties by position (earlier frame, then earlier token), so the
    mask is deterministic, and identical frames lose their tokens from the end of the video first.
    """
    num_frames, per_frame = video_tokens.shape[:2]
    if not 0 < kept <= num_frames * per_frame:
        raise ValueError(f"kept={kept} must be in [1, {num_frames * per_frame}] for {num_frames} x {per_frame} tokens")
    scores = evs_dissimilarity(video_tokens.detach()).flatten()  # (T * P,)
    order = torch.argsort(scores, descending=True, stable=True)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[order[:kept]] = True
    return mask.view(num_frames, per_frame)


def apply_evs(video_tokens: Tensor, kept: int) -> tuple[Tensor, Tensor]:
    """(T, P, D) -> (kept tokens (kept, D) in frame-major order, kept per frame (T,) int64).

    Only the selection is discrete: gradients flow into every kept token as usual.
    """
    mask = evs_keep_mask(video_tokens, kept)
    return video_tokens.flatten(0, 1)[mask.flatten()], mask.sum(dim=1)


def relayout_video_span(span_ids: Tensor, frame_counts: Tensor, context_id: int, end_id: int) -> Tensor:
    """(S,) ids of one video (per frame: label, `<img>`, context tokens, `</img>`) -> the same
    span with frame t holding `frame_counts[t]` context tokens; labels and markers keep their order.

    Each non-context token moves by the change in context tokens before it: a frame's label and
    `<img>` by the change over the earlier frames, its `</img>` by that plus its own change.
    """
    num_frames = frame_counts.shape[0]
    is_end = span_ids == end_id
    is_context = span_ids == context_id
    if int(is_end.sum()) != num_frames or not bool(is_end[-1]):
        raise ValueError(f"a video span of {num_frames} frames must hold {num_frames} `</img>` markers and end "
                         f"with one; it holds {int(is_end.sum())}")
    if int(is_context.sum()) != int(frame_counts.sum()):
        raise ValueError(f"the video span holds {int(is_context.sum())} context tokens but EVS keeps "
                         f"{int(frame_counts.sum())}")
    frame = torch.cumsum(is_end, 0) - is_end.long()  # (S,) frame of each token: ends before it
    provisional = torch.bincount(frame[is_context], minlength=num_frames)  # (T,)
    change = frame_counts.to(provisional) - provisional
    through = torch.cumsum(change, 0)  # (T,) shift of what follows frame t's context
    shift = torch.where(is_end, through[frame], (through - change)[frame])  # (S,)
    fixed = torch.nonzero(~is_context).squeeze(1)
    out = torch.full_like(span_ids, context_id)
    out[fixed + shift[fixed]] = span_ids[fixed]
    return out


def prune_videos(media: Tensor, input_ids: Tensor, video_evs: Tensor, tokens_per_tile: int,
                 context_id: int, end_id: int) -> tuple[Tensor, Tensor]:
    """Apply EVS to every video of a batch.

    media: (N * P, D) projector outputs of all tiles in token order; input_ids: (B, L);
    video_evs: (V, 5) int64 rows `[first_tile, num_frames, kept, span_start, span_length]`
    (`data_pipelines.training.batch.PackedBatch.video_evs`, span_start a flat index over B * L).
    Returns media with each video's T * P tokens replaced by its kept ones, (N * P - pruned, D),
    and input_ids with each video span laid out for its real per-frame counts, (B, L).
    """
    flat_ids = input_ids.reshape(-1).clone()
    pieces, cursor = [], 0  # cursor: first tile not yet copied into `pieces`
    for first, frames, kept, start, length in video_evs.tolist():
        if first < cursor:
            raise ValueError("video_evs rows must be sorted by first tile and not overlap")
        pieces.append(media[cursor * tokens_per_tile:first * tokens_per_tile])
        video = media[first * tokens_per_tile:(first + frames) * tokens_per_tile]
        if video.shape[0] != frames * tokens_per_tile:
            raise ValueError(f"video at tile {first} has {frames} frames but the batch has "
                             f"{media.shape[0] // tokens_per_tile - first} tiles from there")
        kept_tokens, counts = apply_evs(video.view(frames, tokens_per_tile, -1), kept)
        pieces.append(kept_tokens)
        flat_ids[start:start + length] = relayout_video_span(flat_ids[start:start + length], counts, context_id,
                                                             end_id)
        cursor = first + frames
    pieces.append(media[cursor * tokens_per_tile:])
    return torch.cat(pieces), flat_ids.view_as(input_ids)
