"""The one table of where each tensor of our model lives elsewhere: in a transformers checkpoint
(either HF layout) and, for the language model, in megatron-core's `MambaModel`, with how that
parameter is split over tensor-parallel ranks. The HF converter (`train.hf.conversion`, `compose`,
`train.chat.load`) and the megatron-core engine's weight loader (`train.engines.mcore.weights`) both
read it; nothing else spells out a tensor's other names. (Megatron-Bridge's Nemotron-H mapping
registry is the model: rename, QKV and Mamba in_proj mappings, as data read both ways.)

Two levels:

- `PARTS`: where each part of the vision-language model sits in an HF checkpoint. Our modules are
  the HF ones, so each part is a prefix rename (three RADIO patch-generator tensors are renamed
  whole). The language model sits under `language_model.` in the omni (`vl`) layout and at the top
  in NemotronHForCausalLM's (`lm`); only its tensors are listed one by one:
- `LANGUAGE_MODEL`: one row per language-model tensor (`*` stands for the layer index). Our
  language model keeps transformers' names, so a row's `name` is its HF name too; the row adds the
  megatron parameter it lives in and how that parameter is split over the tensor-parallel ranks:
  - REPLICATED: whole on every rank (the norms of the layers, the final norm);
  - COLUMN: split along dim 0 (output features; the vocabulary of the embedding and the head;
    Mamba's per-head `dt_bias` / `A_log` / `D` and per-channel gated norm);
  - ROW: split along dim 1 (input features: `out_proj`, `linear_proj`, `linear_fc2`);
  - parts(...): dim 0 is a run of named parts, each split over the ranks, so rank r holds
    [z_r | x_r | B_r | C_r | dt_r] of Mamba's `in_proj` output ([x_r | B_r | C_r] of its conv1d);
  - `qkv` "q" | "k" | "v": a slice of megatron's fused `linear_qkv`, laid out per KV group as
    [q heads of the group | k | v] and split over the ranks by whole KV groups (COLUMN).

HF tensors with no counterpart in our model (`CARRIED_PATTERNS`: RADIO's video embedder, summary
indices and input normaliser, MTP heads) are carried unchanged next to a native checkpoint and
written back on export, so HF -> native -> HF is bit-exact. Any other tensor without a row is an
error, never a drop. Every mapping moves whole tensors: round trips are bit-exact. What a VL export
writes for the omni tensors our model lacks (the video embedder, layer scales, summary indices),
carried or not, is `train.hf.untrained`'s to say.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from torch import Tensor

from train.hf.errors import ConversionError

if TYPE_CHECKING:
    from train.config.schema import LanguageModelConfig

Layout = Literal["lm", "vl"]

# -- tensor-parallel layouts of a megatron parameter ------------------------------------------------
REPLICATED = ("whole",)
COLUMN = ("split", 0)
ROW = ("split", 1)


def parts(*names: str) -> tuple:
    """Dim 0 holds the named parts in this order; each is split over the ranks (`part_sizes`)."""
    return ("parts", names)


def part_sizes(lm: LanguageModelConfig) -> dict[str, int]:
    """Rows of each part of a Mamba layer's in_proj output [z | x | B | C | dt] and conv1d channels."""
    inner, groups_state = lm.mamba_intermediate_size, lm.n_groups * lm.ssm_state_size
    return {"z": inner, "x": inner, "B": groups_state, "C": groups_state, "dt": lm.mamba_num_heads}


# -- the language model, tensor by tensor -------------------------------------------------------------
@dataclass(frozen=True)
class LMTensor:
    name: str          # ours and HF's (NemotronHForCausalLM; `*`: the layer index)
    megatron: str      # the megatron-core parameter holding it (`*`: the same layer index)
    split: tuple       # that parameter's tensor-parallel layout
    layer: str = ""    # the kind of layer holding it ("M" Mamba, "*" attention, "-" MLP); "": none
    qkv: str = ""      # "q" | "k" | "v": its slice of the fused linear_qkv


_L, _D = "backbone.layers.*.", "decoder.layers.*."
# In the native model's order: the table order is the order of `language_model_tensors`.
LANGUAGE_MODEL = (
    LMTensor("backbone.embeddings.weight", "embedding.word_embeddings.weight", COLUMN),
    LMTensor("backbone.norm_f.weight", "decoder.final_norm.weight", REPLICATED),
    LMTensor("lm_head.weight", "output_layer.weight", COLUMN),
    # Mamba layers
    LMTensor(_L + "norm.weight", _D + "norm.weight", REPLICATED, "M"),
    LMTensor(_L + "mixer.in_proj.weight", _D + "mixer.in_proj.weight", parts("z", "x", "B", "C", "dt"), "M"),
    LMTensor(_L + "mixer.conv1d.weight", _D + "mixer.conv1d.weight", parts("x", "B", "C"), "M"),
    LMTensor(_L + "mixer.conv1d.bias", _D + "mixer.conv1d.bias", parts("x", "B", "C"), "M"),
    LMTensor(_L + "mixer.dt_bias", _D + "mixer.dt_bias", COLUMN, "M"),
    LMTensor(_L + "mixer.A_log", _D + "mixer.A_log", COLUMN, "M"),
    LMTensor(_L + "mixer.D", _D + "mixer.D", COLUMN, "M"),
    LMTensor(_L + "mixer.norm.weight", _D + "mixer.norm.weight", COLUMN, "M"),
    LMTensor(_L + "mixer.out_proj.weight", _D + "mixer.out_proj.weight", ROW, "M"),
    # attention layers
    LMTensor(_L + "norm.weight", _D + "input_layernorm.weight", REPLICATED, "*"),
    LMTensor(_L + "mixer.q_proj.weight", _D + "self_attention.linear_qkv.weight", COLUMN, "*", qkv="q"),
    LMTensor(_L + "mixer.k_proj.weight", _D + "self_attention.linear_qkv.weight", COLUMN, "*", qkv="k"),
    LMTensor(_L + "mixer.v_proj.weight", _D + "self_attention.linear_qkv.weight", COLUMN, "*", qkv="v"),
    LMTensor(_L + "mixer.o_proj.weight", _D + "self_attention.linear_proj.weight", ROW, "*"),
    # MLP layers
    LMTensor(_L + "norm.weight", _D + "pre_mlp_layernorm.weight", REPLICATED, "-"),
    LMTensor(_L + "mixer.up_proj.weight", _D + "mlp.linear_fc1.weight", COLUMN, "-"),
    LMTensor(_L + "mixer.down_proj.weight", _D + "mlp.linear_fc2.weight", ROW, "-"),
)
_LM_NAMES = re.compile("|".join(re.escape(row.name).replace(r"\*", r"\d+") for row in LANGUAGE_MODEL))


def lora_factor_split(split: tuple, factor: str) -> tuple:
    """The tensor-parallel layout of a LoRA factor ("A", "B", or DoRA's "magnitude_vector", one per
    output row, laid out as B) on a linear whose weight is laid out as `split`: the factor sharing the
    split dimension is split the same way, the other is whole on every rank. A column-parallel base
    (output rows split, or a run of parts each split: Mamba's in_proj) splits B [out, r] as itself and
    keeps A [r, in] whole; a row-parallel base (input columns split) splits A along its input and
    keeps B whole. So TP ranks' adapters join into the native ones bit-exactly."""
    if split == ROW:
        return ROW if factor == "A" else REPLICATED
    return REPLICATED if factor == "A" else split


@functools.lru_cache(maxsize=8)
def language_model_tensors(pattern: str) -> tuple[LMTensor, ...]:
    """Every tensor of a language model with this layer pattern: its rows with `*` made the layer
    index, in the native model's order (embedding, final norm, head, then layer by layer)."""
    out = [row for row in LANGUAGE_MODEL if not row.layer]
    for i, kind in enumerate(pattern):
        out += [replace(row, name=row.name.replace("*", str(i)), megatron=row.megatron.replace("*", str(i)))
                for row in LANGUAGE_MODEL if row.layer == kind]
    return tuple(out)


def is_language_model_tensor(name: str) -> bool:
    """Whether `name` (under the language model) is a row of LANGUAGE_MODEL."""
    return _LM_NAMES.fullmatch(name) is not None


# -- the parts of the vision-language model in an HF checkpoint -------------------------------------
LM_PREFIX = "language_model."
RADIO = "vision_model.radio_model."
RADIO_MODEL = RADIO + "model."
RADIO_SUMMARY_IDXS = RADIO + "summary_idxs"  # a buffer transformers' RADIO needs; ours has no use for it
RADIO_VIDEO_EMBEDDER = RADIO_MODEL + "patch_generator.video_embedder.weight"  # tubelets; ours embeds frames as images


@dataclass(frozen=True)
class Part:
    native: str              # our name prefix (ending in ".") or a whole tensor name
    vl: str                  # the same in the omni layout
    lm: str | None = None    # in NemotronHForCausalLM's layout; None: not in it


PARTS = (
    Part(LM_PREFIX, vl=LM_PREFIX, lm=""),  # tensor by tensor: LANGUAGE_MODEL
    Part("projector.mlp1.", vl="mlp1."),
    Part("vision_model.patch_embed.", vl=RADIO_MODEL + "patch_generator.embedder."),
    Part("vision_model.pos_embed", vl=RADIO_MODEL + "patch_generator.pos_embed"),
    Part("vision_model.cls_token", vl=RADIO_MODEL + "patch_generator.cls_token.token"),
    Part("vision_model.blocks.", vl=RADIO_MODEL + "blocks."),
)

# HF tensors with no counterpart in our model. Carried, never dropped: see the module docstring.
CARRIED_PATTERNS = (
    re.compile(r"^vision_model\.radio_model\.model\.patch_generator\.video_embedder\."),
    re.compile(r"^vision_model\.radio_model\.summary_idxs$"),
    re.compile(r"^vision_model\.radio_model\.input_conditioner\."),
    re.compile(r"^(language_model\.)?mtp\."),
)


def _rest(name: str, prefix: str, part: Part) -> str | None:
    """What follows `prefix` in `name` (a prefix: "" or ending in "."; else a whole name), or None
    when `name` is not under it. Under the language model, only the names of its rows count."""
    if prefix == "" or prefix.endswith("."):
        rest = name[len(prefix):] if name.startswith(prefix) else None
    else:
        rest = "" if name == prefix else None
    if rest is not None and part.native == LM_PREFIX and not is_language_model_tensor(rest):
        return None
    return rest


def hf_key_to_native(key: str) -> str:
    """An HF tensor name (either layout) -> ours in the vision-language model."""
    for part in PARTS:
        for prefix in (part.vl, part.lm):
            rest = None if prefix is None else _rest(key, prefix, part)
            if rest is not None:
                return part.native + rest
    raise ConversionError(f"no native name for HF tensor {key!r}")


def native_key_to_hf(key: str, layout: Layout) -> str:
    """Our tensor name -> its HF name in `layout`."""
    for part in PARTS:
        rest = _rest(key, part.native, part)
        prefix = part.vl if layout == "vl" else part.lm
        if rest is not None and prefix is not None:
            return prefix + rest
    raise ConversionError(f"no HF name for native tensor {key!r} (layout {layout})")


def hf_to_native_state(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF on-disk names (lm or vl layout, carried tensors removed) -> VLM state dict names."""
    return {hf_key_to_native(k): v for k, v in hf_state.items()}


def native_to_hf_state(state: dict[str, Tensor], layout: Layout = "lm") -> dict[str, Tensor]:
    """VLM state dict -> HF on-disk names. `lm` keeps only the language model."""
    if layout == "lm":
        state = {k: v for k, v in state.items() if k.startswith(LM_PREFIX)}
    return {native_key_to_hf(k, layout): v for k, v in state.items()}


def is_carried(hf_key: str) -> bool:
    return any(p.search(hf_key) for p in CARRIED_PATTERNS)


def split_carried(hf_state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(tensors our model uses, tensors carried unchanged)."""
    used, carried = {}, {}
    for key, tensor in hf_state.items():
        (carried if is_carried(key) else used)[key] = tensor
    return used, carried


def relayout_carried(carried: dict[str, Tensor], layout: Layout) -> dict[str, Tensor]:
    """Carried tensors of either source layout, named for `layout` (an LM export keeps only the
    language model's)."""
    out = {}
    for key, tensor in carried.items():
        lm_key = key.removeprefix(LM_PREFIX) if key.startswith(LM_PREFIX) else None
        if layout == "lm":
            if lm_key is not None or key.startswith("mtp."):
                out[lm_key or key] = tensor
        else:
            out[LM_PREFIX + key if key.startswith("mtp.") else key] = tensor
    return out
