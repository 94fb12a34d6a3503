"""What an exported HF directory needs besides weights so transformers serves it as it is.

`native_to_hf` writes the weights and config.json; this module adds the tokenizer (with its chat
template), `generation_config.json` (the end-of-turn tokens the model was trained to stop on), and
for the VL layout the nemotron_h_omni processor files (image and video processor configs sized
from the run's tiling), so that

    AutoTokenizer + AutoModelForCausalLM          (lm layout)
    AutoProcessor + NemotronH_Omni_Reasoning_V3   (vl layout)

load the directory with no extra arguments and generate what `train.chat` generates.

The processor (`processor_configs`): transformers' nemotron_h_omni image processor resizes a whole image to one patch
grid between `min_num_patches` and `max_num_patches`; training cut images into InternVL tiles.
The export sets the bounds from the tiling (at least one tile, at most `max_tiles` + thumbnail
worth of patches), so one tile-sized image passes through the processor unchanged and a large
image gets the patch budget training gave it. A prompt laid out exactly as in training (tiles +
thumbnail) comes from `train.chat` / `train.chat.session.build_prompt`.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_pipelines.training import special_tokens as st
from data_pipelines.training.tiling import IMAGE_NORMALIZATION
from train.config.schema import Config

PROCESSOR_CLASS = "NemotronH_Omni_Reasoning_V3Processor"
BICUBIC = 3  # PIL's resampling code, as transformers stores it
VIDEO_TEMPORAL_PATCH = 2  # = the exported config's video_temporal_patch_size

# Files that make a directory an HF tokenizer (any one of them, with tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ServingFilesError(ValueError):
    """The export cannot include a file transformers needs; the message says how to supply it."""


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").exists() and any((directory / f).exists() for f in TOKENIZER_FILES)


def find_tokenizer(cfg: Config, run_dir: Path, explicit: str | Path | None) -> Path:
    """The tokenizer the run trained with: `explicit`, else `data.tokenizer` as written in the run's
    config. A relative path was resolved from training's working directory, which is usually a
    directory above the run (`run.dir=runs/x`): those are tried nearest first, then the current one."""
    if explicit is not None:
        path = Path(explicit)
        if not has_tokenizer(path):
            raise ServingFilesError(f"--tokenizer {path}: not a tokenizer directory (needs tokenizer_config.json "
                                    f"and one of {', '.join(TOKENIZER_FILES)})")
        return path
    configured = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    if configured is not None:
        above = [parent / configured for parent in run_dir.resolve().parents]
        candidates = [configured] if configured.is_absolute() else [*above, configured]
        for candidate in candidates:
            if has_tokenizer(candidate):
                return candidate
    raise ServingFilesError(
        f"no tokenizer found for {run_dir} (data.tokenizer={cfg.data.tokenizer!r} does not exist from here): "
        "pass --tokenizer DIR, or --weights-only for a directory transformers cannot generate with")


def load_tokenizer(tokenizer_dir: Path, vocab_size: int):
    """The tokenizer to export, refused when it cannot be the model's: ids past the embedding, or no
    chat template (transformers could not build the prompts the model was trained on)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > vocab_size:
        raise ServingFilesError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens, more than the model's "
                                f"vocab_size {vocab_size}: it is not this model's tokenizer (pass --tokenizer DIR)")
    if not getattr(tokenizer, "chat_template", None):
        raise ServingFilesError(f"the tokenizer in {tokenizer_dir} has no chat template: transformers could not "
                                "build the prompts the model was trained on")
    return tokenizer


def image_token_id_of(tokenizer) -> int:
    """The id of the token each visual embedding replaces (`<image>`), as config.json needs it."""
    token_id = tokenizer.convert_tokens_to_ids(st.IMG_CONTEXT)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ServingFilesError(f"the tokenizer has no {st.IMG_CONTEXT} token, which the VL layout needs")
    return token_id


def generation_config(tokenizer) -> dict:
    """Greedy decoding that stops at the end of the assistant turn, as `train.chat` does."""
    def token_id(token: str) -> int | None:
        found = tokenizer.convert_tokens_to_ids(token)
        return None if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token) else found

    stops = [i for i in (token_id(st.IM_END), token_id(st.EOS)) if i is not None]
    return {"bos_token_id": token_id(st.BOS), "eos_token_id": stops, "pad_token_id": token_id(st.PAD), "do_sample": False}


def processor_configs(cfg: Config) -> dict[str, dict]:
    """File name -> contents of transformers' nemotron_h_omni processor configs for this run's
    normalisation and patch budget. Written as JSON rather than through the processor classes,
    which import torchvision (a CUDA build on PyPI) even to be constructed."""
    vision, data = cfg.model.vision, cfg.data
    mean, std = IMAGE_NORMALIZATION[vision.normalization]
    patches_per_tile = vision.patches_per_side ** 2
    tiles_per_image = data.max_tiles + (1 if data.use_thumbnail else 0)
    common = {"patch_size": vision.patch_size, "downsample_ratio": cfg.model.projector.downsample_ratio,
              "image_mean": list(mean), "image_std": list(std), "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "do_convert_rgb": True, "resample": BICUBIC}
    image = {"image_processor_type": "NemotronH_Omni_Reasoning_V3ImageProcessor", **common,
             "min_num_patches": patches_per_tile, "max_num_patches": patches_per_tile * tiles_per_image,
             "max_model_len": data.seq_length}
    # Training gives each video frame one square tile; transformers then pairs frames into tubelets
    # for its temporal embedder, which embeds a tubelet as its mean frame (train.hf.untrained).
    video = {"video_processor_type": "NemotronH_Omni_Reasoning_V3VideoProcessor", **common,
             "norm_mean": list(mean), "norm_std": list(std), "video_target_num_patches": patches_per_tile,
             "video_maintain_aspect_ratio": False, "temporal_patch_size": VIDEO_TEMPORAL_PATCH}
    processor = {"processor_class": PROCESSOR_CLASS, "image_processor": image, "video_processor": video,
                 "video_temporal_patch_dim": VIDEO_TEMPORAL_PATCH}
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video,
            "processor_config.json": processor}


def write_serving_files(dst: Path, cfg: Config, layout: str, tokenizer) -> list[str]:
    """Tokenizer (+ processor configs for `vl`) and generation config into `dst`; returns the files added."""
    from transformers import GenerationConfig

    before = {p.name for p in dst.iterdir()}
    if layout == "vl":
        tokenizer.init_kwargs["processor_class"] = PROCESSOR_CLASS
        for name, contents in processor_configs(cfg).items():
            (dst / name).write_text(json.dumps(contents, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(dst)
    if not (dst / "generation_config.json").exists():  # an HF source's own (sampling settings) is kept
        GenerationConfig(**generation_config(tokenizer)).save_pretrained(dst)
    return sorted({p.name for p in dst.iterdir()} - before)
