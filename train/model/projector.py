"""Pixel shuffle (0.5: 2x2 patches -> one token with 4x the channels) and the MLP into the LM."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from train.config.schema import ProjectorConfig
from train.model.language_model import RMSNorm
from train.ops.activations import squared_relu


def pixel_shuffle(x: Tensor, ratio: float) -> Tensor:
    """(N, H, W, C) -> (N, H*ratio, W*ratio, C/ratio^2), InternVL's channel ordering.

    Folds the width into channels, transposes, folds the height, and transposes back, so each
    output token concatenates a (1/ratio x 1/ratio) neighbourhood of patches.
    """
    n, h, w, c = x.shape
    x = x.reshape(n, h, int(w * ratio), int(c / ratio))
    x = x.permute(0, 2, 1, 3).reshape(n, int(w * ratio), int(h * ratio), int(c / (ratio * ratio)))
    return x.permute(0, 2, 1, 3).contiguous()


class SquaredReLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return squared_relu(x)


class Projector(nn.Module):
    """(N, side, side, D_vit) -> (N, tokens_per_tile, D_lm)."""

    def __init__(self, cfg: ProjectorConfig, vision_hidden: int, lm_hidden: int, eps: float = 1e-5):
        super().__init__()
        self.ratio = cfg.downsample_ratio
        in_dim = int(vision_hidden / (cfg.downsample_ratio ** 2))
        # Index layout mirrors the released checkpoint's `mlp1.{0,1,3}`.
        self.mlp1 = nn.Sequential(
            RMSNorm(in_dim, eps),
            nn.Linear(in_dim, cfg.hidden_size, bias=False),
            SquaredReLU(),
            nn.Linear(cfg.hidden_size, lm_hidden, bias=False),
        )

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02, generator=generator)
            elif hasattr(module, "weight") and module.weight is not None:
                nn.init.ones_(module.weight)

    def forward(self, features: Tensor) -> Tensor:
        shuffled = pixel_shuffle(features, self.ratio)  # (N, side/2, side/2, 4*D_vit)
        return self.mlp1(shuffled.flatten(1, 2))
