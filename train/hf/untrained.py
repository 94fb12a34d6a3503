"""The tensors transformers' nemotron_h_omni model has and our model does not, and what a VL export
writes for each, so that `AutoModelForImageTextToText.from_pretrained` initialises nothing at random:

- RADIO's video tubelet embedder (`...patch_generator.video_embedder.weight`, transformers'
  `vision_model.embeddings.video_patch_projection.weight`, (D, T * 3 * p * p)). transformers' video
  path packs T = `video_temporal_patch_size` consecutive frames into one tubelet along the channels,
  so a tubelet patch flattens as (t, c, y, x), and projects it with this matrix. This recipe never
  trains it: training embeds every video frame as an image tile through the image patch embedding
  (`vision_model.patch_embed`, (D, 3 * p * p)). The export writes
  - the source's own, carried from an HF import (it was trained alongside that source's image patch
    embedding), while the image patch embedding is still the imported one: HF -> native -> HF stays
    bit-exact;
  - otherwise (every trained run, whose run directory holds no HF source, and an import whose ViT
    was then trained in place) the image patch embedding repeated over the T frames and divided by
    T: a tubelet embeds exactly as its mean frame does through the image path (the embedding is
    linear), so a tubelet of T identical frames gives that frame's image embedding, as training saw it.
- RADIO's per-block layer scales (`blocks.N.layer_scale{1,2}.lambda1`) when our ViT has none
  (`model.vision.layer_scale=false`): ones, the identity our blocks compute. (transformers would
  quietly fill the same ones from `layerscale_value`: RADIO lists them as ignorable when missing.)
- RADIO's `summary_idxs` buffer, from the exported config (when no HF source carried one).

An import records which image patch embedding its carried video embedder belongs to (a SHA-256 of
its values, in `hf_source/extra.safetensors`' metadata: `carried_metadata`); an import written
before that record existed exports the derived embedder.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from train.config.schema import ModelConfig
from train.hf.mapping import RADIO_MODEL, RADIO_SUMMARY_IDXS, RADIO_VIDEO_EMBEDDER

PATCH_EMBED = "vision_model.patch_embed.weight"  # ours: the image patch embedding, (D, 3 * p * p)
PAIRED_PATCH_EMBED = "video_embedder_paired_with"  # extra.safetensors metadata: fingerprint() of it
CARRIED, DERIVED = "carried from the HF source", "derived from the image patch embedding"


def fingerprint(tensor: Tensor) -> str:
    """SHA-256 of a tensor's values (as fp32, so a bf16 import upcast by training still matches)."""
    return hashlib.sha256(tensor.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def carried_metadata(native_state: dict[str, Tensor], carried: dict[str, Tensor]) -> dict[str, str]:
    """What an import records next to its carried tensors: the image patch embedding a carried video
    embedder was trained alongside."""
    if RADIO_VIDEO_EMBEDDER in carried and PATCH_EMBED in native_state:
        return {PAIRED_PATCH_EMBED: fingerprint(native_state[PATCH_EMBED])}
    return {}


def video_projection_from_image(patch_embed: Tensor, temporal_patch: int) -> Tensor:
    """(D, 3 * p * p) image patch embedding -> (D, T * 3 * p * p) tubelet embedding of the mean frame:
    the tubelet's (t, c, y, x) columns hold the image weights once per frame t, divided by T."""
    return (patch_embed.float().repeat(1, temporal_patch) / temporal_patch).to(patch_embed.dtype)


def complete_vl_state(hf_state: dict[str, Tensor], native_state: dict[str, Tensor], cfg: ModelConfig,
                      vision_config: dict, carried_meta: dict[str, str]) -> tuple[dict[str, Tensor], str]:
    """(the tensors to add to a VL export's `hf_state` (ours + carried), where its video embedder
    comes from). `vision_config` is the exported config.json's; a stale carried embedder is replaced."""
    patch_embed = native_state[PATCH_EMBED]
    added: dict[str, Tensor] = {}
    if RADIO_SUMMARY_IDXS not in hf_state:
        added[RADIO_SUMMARY_IDXS] = torch.tensor(vision_config["summary_idxs"], dtype=torch.int64)
    if not cfg.vision.layer_scale:
        ones = torch.ones(cfg.vision.hidden_size, dtype=patch_embed.dtype)
        for i in range(cfg.vision.num_layers):
            for scale in ("layer_scale1", "layer_scale2"):
                added[f"{RADIO_MODEL}blocks.{i}.{scale}.lambda1"] = ones.clone()
    derived = video_projection_from_image(patch_embed, vision_config["video_temporal_patch_size"])
    carried = hf_state.get(RADIO_VIDEO_EMBEDDER)
    if (carried is not None and carried.shape == derived.shape
            and carried_meta.get(PAIRED_PATCH_EMBED) == fingerprint(patch_embed)):
        return added, CARRIED
    added[RADIO_VIDEO_EMBEDDER] = derived
    return added, DERIVED
