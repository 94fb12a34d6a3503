"""`init.from_checkpoint` on a transformers Nemotron-H directory: converted in memory, loaded as its
native conversion would be, with the parts it lacks reported random and another model refused in
one line naming what to set."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM
from transformers.models.nemotron_h_omni import NemotronH_Omni_Reasoning_V3, NemotronH_Omni_Reasoning_V3_Config

from data_pipelines.training import special_tokens as st
from data_pipelines.training.config import ConfigError
from train.config.compose import load_config
from train.hf.config import ours_to_hf_lm_config, ours_to_hf_vl_config
from train.hf.files import read_hf_weights
from train.hf.mapping import hf_to_native_state, split_carried
from train.engines.assembly import assemble
from train.model.vlm import VisionLanguageModel
from train.parallel.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved off its init (norms, A_log, D too), so a tensor left unloaded cannot pass."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def stage_config(synth_data, recipe="stage1_image_sft", *overrides):
    return load_config(recipe, ["smoke=cpu", f"data.synth_dir={synth_data.root}", *overrides])


@pytest.fixture(scope="module")
def hf_lm(tmp_path_factory, synth_data):
    """A released-style LM-only directory (NemotronHForCausalLM.save_pretrained, bf16) of the smoke LM's shape."""
    lm = stage_config(synth_data).model.language_model
    path = tmp_path_factory.mktemp("hf") / "lm"
    torch.manual_seed(0)
    perturbed(NemotronHForCausalLM(NemotronHConfig.from_dict(ours_to_hf_lm_config(lm)))).to(torch.bfloat16) \
        .save_pretrained(path)
    return path


def loaded(model: VisionLanguageModel, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_a_transformers_lm_directory_starts_a_stage(hf_lm, synth_data, tokenizer):
    cfg = stage_config(synth_data, "stage1_image_sft", f"init.from_checkpoint={hf_lm}")
    lines, files = [], sorted(hf_lm.iterdir())
    stage = assemble(cfg, CPU, tokenizer.special_ids, train=False, log=lines.append)
    # The language model holds the HF weights mapped to our names (bf16 in the files, fp32 here).
    expected = hf_to_native_state(split_carried(read_hf_weights(hf_lm))[0])
    got = loaded(stage.model, "language_model.")
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], v.float()) for k, v in expected.items())
    # The vision tower and projector keep the seeded init, reported random (the smoke overlay allows it).
    fresh = VisionLanguageModel(cfg.model, image_token_id=tokenizer.special_ids[st.IMG_CONTEXT])
    fresh.reset_parameters(cfg.seed)
    for part in ("vision_model.", "projector."):
        assert all(torch.equal(v, loaded(fresh, part)[k]) for k, v in loaded(stage.model, part).items())
    assert stage.random_parts == sorted(set(cfg.trainable.frozen) & {"vision_model", "projector"})
    assert lines == [f"init.from_checkpoint: converted the transformers checkpoint {hf_lm} (a language model, "
                     "nemotron_h) to the native layout on the fly, in memory; projector and vision_model stay random"]
    assert sorted(hf_lm.iterdir()) == files  # converted in memory: nothing written


def test_a_frozen_part_the_lm_directory_lacks_is_refused_naming_the_fix(hf_lm, synth_data, tokenizer):
    """Stage 0 freezes the ViT: an LM-only directory leaves it random; the message says so for an HF
    source and offers compose with that very directory."""
    cfg = stage_config(synth_data, "stage0_projector_warmup", f"init.from_checkpoint={hf_lm}", "init.allow_random=[]")
    with pytest.raises(ConfigError) as err:
        assemble(cfg, CPU, tokenizer.special_ids, train=False, log=lambda _: None)
    message = str(err.value)
    assert message.startswith(f"trainable.vision_model=false but init.from_checkpoint={hf_lm} is a transformers "
                              "language model, with no weights for them: the stage would train around random "
                              "vision_model weights")
    assert f"python -m train.convert compose --lm {hf_lm} --vision HF_RADIO" in message
    assert "init.allow_random=[vision_model]" in message and "\n" not in message


def test_another_model_is_one_line_naming_the_fields_or_the_tensor(hf_lm, synth_data, tokenizer, tmp_path):
    # config.json of another size: caught from the config, field by field, before any tensor is read.
    wider = tmp_path / "wider"
    shutil.copytree(hf_lm, wider)
    config = json.loads((wider / "config.json").read_text())
    config.update(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    (wider / "config.json").write_text(json.dumps(config))
    cfg = stage_config(synth_data, "stage1_image_sft", f"init.from_checkpoint={wider}")
    with pytest.raises(ConfigError) as err:
        assemble(cfg, CPU, tokenizer.special_ids, train=False)
    assert str(err.value) == (
        f"init.from_checkpoint={wider}: its config.json describes another model (model.language_model.hidden_size=64 "
        "here, 96 there; model.language_model.num_attention_heads=4 here, 6 there); set the model group (model=...) "
        "or those model.* fields to its values (now model=tiny)")

    # Weights that disagree with their own config.json: the native path's message, naming the tensor.
    lying = tmp_path / "lying"
    wider_mlp = dict(ours_to_hf_lm_config(cfg.model.language_model), intermediate_size=160)
    NemotronHForCausalLM(NemotronHConfig.from_dict(wider_mlp)).save_pretrained(lying)
    shutil.copy(hf_lm / "config.json", lying / "config.json")
    cfg.init.from_checkpoint = str(lying)
    with pytest.raises(ConfigError, match=r"^init.from_checkpoint=\S+lying is another model size \(language_model"
                                          r"\.backbone\.layers\.1\.mixer\.up_proj\.weight is \(160, 64\) in \S+ but "
                                          r"\(128, 64\) in this model\); set the model group \(model=...\) or model.\* "
                                          r"sizes its config.json describes \(now model=tiny\)$"):
        assemble(cfg, CPU, tokenizer.special_ids, train=False)


def test_an_omni_directory_loads_every_part(synth_data, tokenizer, tmp_path):
    cfg = stage_config(synth_data, "stage0_projector_warmup", "init.allow_random=[]")
    image_token_id = tokenizer.special_ids[st.IMG_CONTEXT]
    omni = NemotronH_Omni_Reasoning_V3_Config.from_dict(ours_to_hf_vl_config(cfg.model, image_token_id))
    torch.manual_seed(0)
    # In shards, as the released 12B is: each tensor read from its own file.
    perturbed(NemotronH_Omni_Reasoning_V3(omni)).save_pretrained(tmp_path / "omni", max_shard_size="300KB")
    assert len(list((tmp_path / "omni").glob("model-*.safetensors"))) > 1
    cfg.init.from_checkpoint = str(tmp_path / "omni")
    stage = assemble(cfg, CPU, tokenizer.special_ids, train=False, log=lambda _: None)
    assert stage.random_parts == []
    expected = hf_to_native_state(split_carried(read_hf_weights(tmp_path / "omni"))[0])
    got = stage.model.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], v.float()) for k, v in expected.items())
