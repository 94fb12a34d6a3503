"""Vision-language model: ViT -> pixel shuffle + MLP -> spliced into the hybrid LM's embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from data_pipelines.training.conversation import IGNORE_INDEX
from data_pipelines.training.tiling import IMAGE_NORMALIZATION
from train.config.schema import ModelConfig
from train.model.evs import prune_videos
from train.model.language_model import HybridLanguageModel
from train.model.projector import Projector
from train.model.vision import VisionEncoder


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, image_token_id: int, image_end_id: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.image_token_id = image_token_id
        # `</img>`: EVS finds each video frame's end by it (only batches with `video_evs` need it).
        self.image_end_id = image_end_id
        self.vision_model = VisionEncoder(cfg.vision, cfg.kernels.activation_checkpointing == "layers")
        self.projector = Projector(cfg.projector, cfg.vision.hidden_size, cfg.language_model.hidden_size,
                                   cfg.language_model.norm_eps)
        self.language_model = HybridLanguageModel(cfg.language_model, cfg.kernels)
        mean, std = IMAGE_NORMALIZATION[cfg.vision.normalization]
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.vision_model.reset_parameters(generator)
        self.language_model.reset_parameters(generator)
        for module in self.projector.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02, generator=generator)
            elif hasattr(module, "weight") and module.weight is not None:
                nn.init.ones_(module.weight)

    def embed_media(self, tiles: Tensor) -> Tensor:
        """uint8 (N, 3, T, T) -> (N * tokens_per_tile, D_lm). Normalisation happens here, on the
        model's device, so the data path ships uint8 (4x less host memory and transfer)."""
        pixels = (tiles.to(self.pixel_mean.dtype) / 255.0 - self.pixel_mean) / self.pixel_std
        pixels = pixels.to(self.projector.mlp1[1].weight.dtype)
        return self.projector(self.vision_model(pixels)).flatten(0, 1)

    def hidden_states(self, input_ids: Tensor, tiles: Tensor, seq_idx: Tensor, cu_seqlens: Tensor,
                      video_evs: Tensor | None = None) -> Tensor:
        """(B, L) ids + media -> final normalised hidden states (B, L, D).

        `video_evs` (V, 5) names the videos to prune with EVS (`train.model.evs.prune_videos`):
        their media shrink to the kept tokens and their spans of `input_ids` are laid out anew.
        """
        media = self.embed_media(tiles) if tiles.shape[0] else None
        if video_evs is not None and video_evs.shape[0]:
            if self.image_end_id is None:
                raise ValueError("this batch prunes videos with EVS: build the model with image_end_id (`</img>`)")
            media, input_ids = prune_videos(media, input_ids, video_evs, self.cfg.tokens_per_tile,
                                            self.image_token_id, self.image_end_id)
        embeds = self.language_model.backbone.embeddings(input_ids)
        media_positions = input_ids == self.image_token_id
        num_slots = int(media_positions.sum())
        num_media = 0 if media is None else media.shape[0]
        if num_media != num_slots:
            raise ValueError(f"{num_slots} media tokens in the batch but the tiles give {num_media} embeddings")
        if num_slots:
            embeds = embeds.masked_scatter(media_positions.unsqueeze(-1), media.to(embeds.dtype))
        return self.language_model.backbone(embeds, seq_idx, cu_seqlens)

    def forward(self, input_ids: Tensor, labels: Tensor, tiles: Tensor, seq_idx: Tensor,
                cu_seqlens: Tensor, video_evs: Tensor | None = None,
                loss_weighting: str = "token") -> tuple[Tensor, int]:
        """Weighted sum of next-token cross-entropy over supervised tokens, and their count.

        The caller divides by the global sum of weights (`token_weights` over all micro-batches
        and ranks), so packing and accumulation never change a token's weight. EVS only rewrites
        media spans, which carry no loss, so `labels` stay as they are.
        """
        hidden = self.hidden_states(input_ids, tiles, seq_idx, cu_seqlens, video_evs)
        targets = next_token_targets(labels, seq_idx)
        weights = next_token_targets_weights(token_weights(labels, seq_idx, loss_weighting), seq_idx)
        rows = targets != IGNORE_INDEX
        return chunked_cross_entropy(hidden[rows], targets[rows], self.language_model.lm_head.weight,
                                     self.cfg.loss_chunk_size, weights[rows]), int(rows.sum())


def next_token_targets(labels: Tensor, seq_idx: Tensor) -> Tensor:
    """Target of position t is labels[t+1] if t+1 is in the same sample, else ignored."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    same = seq_idx[:, 1:] == seq_idx[:, :-1]
    targets[:, :-1] = torch.where(same, labels[:, 1:], torch.full_like(labels[:, 1:], IGNORE_INDEX))
    return targets


def token_weights(labels: Tensor, seq_idx: Tensor, mode: str) -> Tensor:
    """Loss weight of each supervised label (0 elsewhere), (B, L) float32.

    "token": 1 per supervised token (per-token mean). "sqrt_turn": each assistant turn (a run of
    consecutive supervised labels within a sample) weighs 1/sqrt(its length) per token, so a turn
    counts sqrt(length) in total: long answers still count more than short ones, but not
    linearly (Megatron's --use-loss-scaling idea of scaling by turn length).
    """
    supervised = labels != IGNORE_INDEX
    if mode == "token":
        return supervised.float()
    if mode != "sqrt_turn":
        raise ValueError(f"unknown loss weighting {mode!r}; use 'token' or 'sqrt_turn'")
    flat_sup, flat_seq = supervised.flatten(), seq_idx.flatten()
    starts = flat_sup.clone()
    starts[1:] &= ~flat_sup[:-1] | (flat_seq[1:] != flat_seq[:-1])
    run = torch.cumsum(starts.long(), 0) * flat_sup  # 1-based turn id per supervised token, 0 elsewhere
    lengths = torch.bincount(run, minlength=int(run.max()) + 1).float()
    weights = torch.where(flat_sup, lengths[run].clamp(min=1).rsqrt(), torch.zeros_like(lengths[run]))
    return weights.reshape(labels.shape)


def next_token_targets_weights(weights: Tensor, seq_idx: Tensor) -> Tensor:
    """Weights aligned with `next_token_targets`: position t carries the weight of label t+1."""
    shifted = torch.zeros_like(weights)
    same = seq_idx[:, 1:] == seq_idx[:, :-1]
    shifted[:, :-1] = torch.where(same, weights[:, 1:], torch.zeros_like(weights[:, 1:]))
    return shifted


def chunked_cross_entropy(hidden: Tensor, targets: Tensor, head_weight: Tensor, chunk_size: int,
                          weights: Tensor | None = None) -> Tensor:
    """sum w * CE(hidden @ head_weight.T, targets) computed `chunk_size` rows at a time.

    Each chunk is recomputed in backward (activation checkpointing), so at most one chunk of
    logits (chunk_size x V) exists at a time instead of L x V.
    """
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    if weights is None:
        weights = torch.ones(targets.shape, dtype=total.dtype, device=targets.device)
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(_chunk_ce, hidden[start:end], targets[start:end], head_weight,
                                   weights[start:end], use_reentrant=False)
    return total


def _chunk_ce(hidden: Tensor, targets: Tensor, head_weight: Tensor, weights: Tensor) -> Tensor:
    logits = hidden @ head_weight.t()
    # bf16 logits lose too much in the softmax: accumulate in at least fp32.
    losses = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")
    return (losses * weights.to(losses.dtype)).sum()
