"""ViT encoder over square tiles (RADIO-style: linear patch embedding, learned positions).

Parameter names follow timm (blocks.N.attn.qkv, blocks.N.mlp.fc1), as RADIO does. With the RADIO
options of `VisionConfig` it computes what transformers' `RadioModel` computes: class + register
tokens prepended, a larger position table resized to the tile grid (CPE), no final norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.config.schema import VisionConfig
from train.model.recompute import recompute_in_backward


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (RADIO's `layer_scale{1,2}.lambda1`, ones at init)."""

    def __init__(self, dim: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.lambda1


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim, hidden = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
        self.heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim)})
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, hidden), "fc2": nn.Linear(hidden, dim)})
        self.layer_scale1 = LayerScale(dim) if cfg.layer_scale else nn.Identity()
        self.layer_scale2 = LayerScale(dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        n, p, d = x.shape
        qkv = self.attn["qkv"](self.norm1(x)).reshape(n, p, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (n, heads, p, head_dim)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, p, d)
        x = x + self.layer_scale1(self.attn["proj"](attn))
        return x + self.layer_scale2(self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.norm2(x)))))


class VisionEncoder(nn.Module):
    """(N, 3, T, T) normalised tiles -> (N, T/patch, T/patch, D) patch features."""

    def __init__(self, cfg: VisionConfig, activation_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.checkpoint_fn = recompute_in_backward
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, cfg.hidden_size, bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_embed_side ** 2, cfg.hidden_size))
        if cfg.num_prefix_tokens:
            self.cls_token = nn.Parameter(torch.zeros(cfg.num_prefix_tokens, cfg.hidden_size))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()

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
        if self.cfg.num_prefix_tokens:
            nn.init.trunc_normal_(self.cls_token, std=0.02, generator=generator)

    def position_embedding(self) -> Tensor:
        """(1, side*side, d): the table itself, or (CPE) the table bilinearly resized to the tile grid."""
        side, table = self.cfg.patches_per_side, self.cfg.pos_embed_side
        if side == table:
            return self.pos_embed
        grid = self.pos_embed.reshape(1, table, table, -1).permute(0, 3, 1, 2)  # (1, d, table, table)
        # Resized in fp32, as RADIO does, so a bf16 table gives the same positions.
        grid = F.interpolate(grid.float(), size=(side, side), mode="bilinear", align_corners=False)
        return grid.flatten(2).transpose(1, 2).to(self.pos_embed.dtype)  # (1, side*side, d)

    def forward(self, tiles: Tensor) -> Tensor:
        n, c, t, _ = tiles.shape
        p, side = self.cfg.patch_size, self.cfg.patches_per_side
        patches = tiles.reshape(n, c, side, p, side, p).permute(0, 2, 4, 1, 3, 5).reshape(n, side * side, c * p * p)
        x = self.patch_embed(patches)  # (n, side*side, d)
        x = x + self.position_embedding()
        prefix = self.cfg.num_prefix_tokens
        if prefix:
            x = torch.cat([self.cls_token.to(x.dtype).expand(n, -1, -1), x], dim=1)  # (n, prefix + side*side, d)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Keep only the block's input; backward reruns its forward.
                x = self.checkpoint_fn(block, x)
            else:
                x = block(x)
        return self.norm(x[:, prefix:]).reshape(n, side, side, -1)
