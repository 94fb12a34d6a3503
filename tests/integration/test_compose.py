"""Stage 0 from released parts: HF Nemotron-H + HF RADIO -> compose -> a smoke Stage 0 from it ->
export as nemotron_h_omni, with transformers' own models as the reference at each end."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from transformers import NemotronHConfig, NemotronHForCausalLM, RadioConfig, RadioModel
from transformers.models.nemotron_h_omni import NemotronH_Omni_Reasoning_V3

from data_pipelines.synth import random_scene, render_scene
from data_pipelines.training.decode import decode_image
from data_pipelines.training.tiling import TilingConfig, tile_image
from tests.integration.helpers import run_module
from train import convert
from train.checkpoint.store import find_latest, load_model_weights, read_marker
from train.config.schema import Config, from_dict
from train.hf.config import ours_to_hf_lm_config
from train.model.language_model import packing_metadata
from train.model.vlm import VisionLanguageModel

# The smoke model's shapes (configs/model/tiny.yaml), so a smoke stage can start from the composition.
TINY = yaml.safe_load(open("configs/model/tiny.yaml"))


def rel_err(expected: torch.Tensor, got: torch.Tensor) -> float:
    return float((expected - got).norm() / expected.norm())


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight moved off its init (layer scales, norms included), so parity means something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Tiny random HF Nemotron-H and RADIO directories, as save_pretrained writes them."""
    root = tmp_path_factory.mktemp("released")
    from train.config.schema import LanguageModelConfig

    lm_cfg = NemotronHConfig.from_dict(ours_to_hf_lm_config(LanguageModelConfig(**TINY["language_model"])))
    torch.manual_seed(0)
    perturbed(NemotronHForCausalLM(lm_cfg), 1).save_pretrained(root / "lm")
    v = TINY["vision"]
    radio_cfg = RadioConfig(hidden_size=v["hidden_size"], num_hidden_layers=v["num_layers"],
                            num_attention_heads=v["num_heads"], patch_size=v["patch_size"], image_size=v["image_size"],
                            max_img_size=v["max_image_size"], num_cls_tokens=v["num_cls_tokens"],
                            num_registers=v["num_registers"])
    perturbed(RadioModel(radio_cfg), 2).save_pretrained(root / "radio")
    return root


def real_tiles(cfg) -> torch.Tensor:
    """uint8 tiles (N, 3, T, T) of a rendered JPEG, cut as training cuts it."""
    import io

    rng = random.Random(0)
    buffer = io.BytesIO()
    render_scene(random_scene(rng, 3), rng).save(buffer, "JPEG", quality=90)
    image = decode_image(buffer.getvalue())
    return tile_image(image, TilingConfig(tile_size=cfg.vision.image_size, max_tiles=4))


def test_compose_then_stage0_then_export_match_transformers(released, tmp_path, capsys):
    assert convert.main(["compose", "--lm", str(released / "lm"), "--vision", str(released / "radio"),
                         "--dst", str(tmp_path / "start"), "--projector-hidden-size", str(TINY["projector"]["hidden_size"]),
                         "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    start = find_latest(tmp_path / "start" / "checkpoints")
    assert summary["checkpoint"] == str(start)
    assert "vision_model.radio_model.summary_idxs" in summary["carried"]
    cfg = from_dict(Config, yaml.safe_load((tmp_path / "start" / "config.yaml").read_text())).model

    # Composed: the vision tower computes what transformers' RadioModel computes on real tiles,
    # the LM what NemotronHForCausalLM computes.
    ours = VisionLanguageModel(cfg, image_token_id=10)
    assert load_model_weights(start, ours) == []  # every part loaded, none random
    ours.eval()
    tiles = real_tiles(cfg)
    assert tiles.shape[0] > 1
    radio = RadioModel.from_pretrained(released / "radio").eval()
    lm = NemotronHForCausalLM.from_pretrained(released / "lm").eval()
    ids = torch.randint(20, cfg.language_model.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_features = radio(tiles.float() / 255).features  # RADIO normalises [0, 1] pixels itself
        pixels = (tiles.float() / 255 - ours.pixel_mean) / ours.pixel_std
        features = ours.vision_model(pixels).flatten(1, 2)
        seq_idx, cu = packing_metadata(ids.shape, None, ids.device)
        logits = ours.language_model.lm_head(ours.hidden_states(ids, tiles[:0], seq_idx, cu))
        expected_logits = lm(ids, use_cache=False).logits
    assert rel_err(expected_features, features) < 1e-5
    assert rel_err(expected_logits, logits) < 1e-5
    # The projector is fresh and seeded: the same seed gives the same weights.
    again = tmp_path / "again"
    assert convert.main(["compose", "--lm", str(released / "lm"), "--vision", str(released / "radio"), "--dst",
                         str(again), "--projector-hidden-size", str(TINY["projector"]["hidden_size"]), "--seed", "3"]) == 0
    twin = VisionLanguageModel(cfg, image_token_id=10)
    load_model_weights(find_latest(again / "checkpoints"), twin)
    assert all(torch.equal(a, b) for a, b in zip(ours.projector.state_dict().values(), twin.projector.state_dict().values()))

    # Composed with compose's default projector width (4x the LM's), not the recipe's: Stage 0 from it
    # stops in one line naming the compose flag that fits the recipe, not a model group that does not exist.
    wide = tmp_path / "wide"
    assert convert.main(["compose", "--lm", str(released / "lm"), "--vision", str(released / "radio"),
                         "--dst", str(wide)]) == 0
    capsys.readouterr()
    refused = run_module(["train", "--config-name", "stage0_projector_warmup", "smoke=cpu", "trainer.max_steps=1",
                          f"init.from_checkpoint={find_latest(wide / 'checkpoints')}", "run.dir=runs/wide"], tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    wide_size, size = 4 * TINY["language_model"]["hidden_size"], TINY["projector"]["hidden_size"]
    [line] = [line for line in refused.stderr.splitlines() if "another model size" in line]
    assert f"rerun compose with --projector-hidden-size {size}" in line
    assert f"set model.projector.hidden_size={wide_size}" in line
    assert "model=lm+radio" not in line and "Traceback" not in refused.stderr

    # Stage 0 from it, random parts refused: nothing frozen is random here, so it trains.
    cwd = tmp_path
    result = run_module(["train", "--config-name", "stage0_projector_warmup", "smoke=cpu", "trainer.max_steps=2",
                         f"init.from_checkpoint={start}", "init.allow_random=[]", "run.dir=runs/s0"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = find_latest(cwd / "runs" / "s0" / "checkpoints")
    assert read_marker(trained)["random_parts"] == []

    # Exported as nemotron_h_omni: transformers' omni model computes what the trained stage computes.
    assert convert.main(["native-to-hf", "--src", str(cwd / "runs" / "s0"), "--dst", str(tmp_path / "hf"),
                         "--layout", "vl"]) == 0
    capsys.readouterr()
    omni = NemotronH_Omni_Reasoning_V3.from_pretrained(tmp_path / "hf").eval()
    stage = VisionLanguageModel(cfg, image_token_id=omni.config.image_token_id)
    load_model_weights(trained, stage)
    stage.eval()
    n, g = tiles.shape[0], cfg.vision.patches_per_side
    patches = pixels.reshape(n, 3, g, 16, g, 16).permute(0, 2, 4, 1, 3, 5).reshape(n * g * g, 3 * 16 * 16)
    with torch.no_grad():
        expected_media = torch.cat(omni.get_image_features(patches, torch.tensor([[g, g]] * n)).pooler_output)
        media = stage.embed_media(tiles)
        # RADIO's vision tower itself was frozen: the export carries the released weights unchanged.
        assert rel_err(expected_features, stage.vision_model(pixels).flatten(1, 2)) < 1e-5
        logits = stage.language_model.lm_head(stage.hidden_states(ids, tiles[:0], seq_idx, cu))
        expected_logits = omni(input_ids=ids).logits
    assert rel_err(expected_media, media) < 1e-5
    assert rel_err(expected_logits, logits) < 1e-5


def test_a_frozen_part_left_random_stops_the_stage(tmp_path):
    """Stage 0 freezes the LM and ViT: without weights for them it refuses, naming the fix."""
    result = run_module(["train", "--config-name", "stage0_projector_warmup", "smoke=cpu", "trainer.max_steps=1",
                         "init.allow_random=[vision_model]", "init.embedded_lm=false", "run.dir=runs/s0"], tmp_path)
    assert result.returncode != 0
    message = result.stderr
    assert "trainable.language_model=false but no init.from_checkpoint loads them" in message
    assert "init.allow_random=[language_model]" in message and "train.convert compose" in message
    assert "Traceback" not in message
    assert not (tmp_path / "runs" / "s0" / "checkpoints").exists()
