"""Vision-language model: ViT -> pixel shuffle + MLP -> spliced into the hybrid LM's embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from data_pipelines.training.batch import PackedBatch
from data_pipelines.training.tiling import IMAGE_NORMALIZATION
from train.config.schema import ModelConfig
from train.model.evs import prune_videos
from train.model.language_model import HybridLanguageModel
from train.model.loss import ChunkedCrossEntropy, LanguageModelLoss
from train.model.projector import Projector
from train.model.vision import VisionEncoder


class VisionLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, image_token_id: int, image_end_id: int | None = None,
                 language_model: nn.Module | None = None, loss: LanguageModelLoss | None = None):
        super().__init__()
        self.cfg = cfg
        self.image_token_id = image_token_id
        # `</img>`: EVS finds each video frame's end by it (only batches with `video_evs` need it).
        self.image_end_id = image_end_id
        self.vision_model = VisionEncoder(cfg.vision, cfg.kernels.activation_checkpointing == "layers")
        self.projector = Projector(cfg.projector, cfg.vision.hidden_size, cfg.language_model.hidden_size,
                                   cfg.language_model.norm_eps)
        # Another engine passes its own language model with the same interface (`embed_tokens`,
        # `hidden_states`, `local_tokens`, `head_weight`) and the loss that goes with its head.
        self.language_model = language_model or HybridLanguageModel(cfg.language_model, cfg.kernels)
        mean, std = IMAGE_NORMALIZATION[cfg.vision.normalization]
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.loss = loss or ChunkedCrossEntropy(cfg.loss_chunk_size)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.vision_model.reset_parameters(generator)
        self.language_model.reset_parameters(generator)
        self.projector.reset_parameters(generator)

    def embed_media(self, tiles: Tensor) -> Tensor:
        """uint8 (N, 3, T, T) -> (N * tokens_per_tile, D_lm). Normalisation happens here, on the
        model's device, so the data path ships uint8 (4x less host memory and transfer)."""
        pixels = (tiles.to(self.pixel_mean.dtype) / 255.0 - self.pixel_mean) / self.pixel_std
        pixels = pixels.to(self.projector.mlp1[1].weight.dtype)
        return self.projector(self.vision_model(pixels)).flatten(0, 1)

    def embed_inputs(self, input_ids: Tensor, tiles: Tensor, video_evs: Tensor | None = None) -> Tensor:
        """(B, L) ids + uint8 tiles (N, 3, T, T) -> the language model's input embeddings (B, L, D),
        media embeddings spliced at the media-token positions. The one path from tokens and pixels to
        the LM, for training and for generation.

        `video_evs` (V, 5) names the videos to prune with EVS (`train.model.evs.prune_videos`):
        their media shrink to the kept tokens and their spans of `input_ids` are laid out anew.
        """
        media = self.embed_media(tiles) if tiles.shape[0] else None  # (N * tokens_per_tile, D)
        if video_evs is not None and video_evs.shape[0]:
            if self.image_end_id is None:
                raise ValueError("this batch prunes videos with EVS: build the model with image_end_id (`</img>`)")
            media, input_ids = prune_videos(media, input_ids, video_evs, self.cfg.tokens_per_tile,
                                            self.image_token_id, self.image_end_id)
        embeds = self.language_model.embed_tokens(input_ids)
        media_positions = input_ids == self.image_token_id
        num_slots = int(media_positions.sum())
        num_media = 0 if media is None else media.shape[0]
        if num_media != num_slots:
            raise ValueError(f"{num_slots} media tokens in the batch but the tiles give {num_media} embeddings")
        if num_slots:
            embeds = embeds.masked_scatter(media_positions.unsqueeze(-1), media.to(embeds.dtype))
        return embeds

    def hidden_states(self, input_ids: Tensor, tiles: Tensor, seq_idx: Tensor, cu_seqlens: Tensor,
                      video_evs: Tensor | None = None) -> Tensor:
        """(B, L) ids + media -> final normalised hidden states (B, L, D)."""
        embeds = self.embed_inputs(input_ids, tiles, video_evs)
        return self.language_model.hidden_states(embeds, seq_idx, cu_seqlens)

    def forward(self, batch: PackedBatch) -> tuple[Tensor, int]:
        """Weighted sum of next-token cross-entropy over the batch's targets, and their count
        (`self.loss`, by default `train.model.loss.ChunkedCrossEntropy`). EVS only rewrites media
        spans, which carry no loss, so the targets stay as the collator made them.

        A pipeline stage of the language model (`train.engines.mcore.pipeline`) before the last
        returns its output activations instead of the loss; one after the first starts from the
        previous stage's activations (no embedding, no media)."""
        lm = self.language_model
        if lm.pre_process:
            hidden = self.hidden_states(batch.input_ids, batch.tiles, batch.seq_idx, batch.cu_seqlens, batch.video_evs)
        else:
            hidden = lm.hidden_states(None, batch.seq_idx, batch.cu_seqlens, rows=tuple(batch.input_ids.shape))
        if not lm.post_process:
            return hidden, 0
        # Under context parallelism, `hidden` holds this rank's tokens only.
        return self.loss(hidden, lm.local_tokens(batch.targets), lm.local_tokens(batch.target_weights), lm.head_weight)
