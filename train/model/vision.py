"""ViT encoder over square tiles (RADIO-style: linear patch embedding, learned positions).

Parameter names follow timm (blocks.N.attn.qkv, blocks.N.mlp.fc1), as RADIO does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.config import VisionConfig


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim, hidden = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
        self.heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim)})
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, hidden), "fc2": nn.Linear(hidden, dim)})

    def forward(self, x: Tensor) -> Tensor:
        n, p, d = x.shape
        qkv = self.attn["qkv"](self.norm1(x)).reshape(n, p, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (n, heads, p, head_dim)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, p, d)
        x = x + self.attn["proj"](attn)
        return x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.norm2(x))))


class VisionEncoder(nn.Module):
    """(N, 3, T, T) normalised tiles -> (N, T/patch, T/patch, D) patch features."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        num_patches = cfg.patches_per_side ** 2
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, cfg.hidden_size, bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, cfg.hidden_size))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, generator=generator)

    def forward(self, tiles: Tensor) -> Tensor:
        n, c, t, _ = tiles.shape
        p, side = self.cfg.patch_size, self.cfg.patches_per_side
        patches = tiles.reshape(n, c, side, p, side, p).permute(0, 2, 4, 1, 3, 5).reshape(n, side * side, c * p * p)
        x = self.patch_embed(patches) + self.pos_embed  # (n, side*side, d)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).reshape(n, side, side, -1)
