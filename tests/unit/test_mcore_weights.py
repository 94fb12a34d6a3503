"""Native / HF weights <-> megatron-core's, whole and split over tensor-parallel ranks: bit-exact."""

from __future__ import annotations

import pytest
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

from train.config.schema import LanguageModelConfig
from train.hf.files import read_hf_weights
from train.hf.mapping import hf_to_native_state, native_to_hf_state, split_carried
from train.model.language_model import HybridLanguageModel
from train.engines.mcore.weights import (
    megatron_to_native,
    native_to_megatron,
    shard_state,
    tp_rule,
    unshard_state,
)

LM = LanguageModelConfig(pattern="M-M*M-*-", hidden_size=32, vocab_size=64, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=8, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=8,
                         n_groups=4, mlp_hidden_size=48)


def native_state(seed: int = 0) -> dict[str, torch.Tensor]:
    model = HybridLanguageModel(LM)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    # Distinct values everywhere (norms too), so a mis-mapped tensor cannot hide.
    return {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
            for i, (k, v) in enumerate(model.state_dict().items())}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_native_to_megatron_shards_and_back_is_bit_exact(tp):
    native = native_state()
    full = native_to_megatron(native, LM)
    shards = [shard_state(full, LM, rank, tp) for rank in range(tp)]
    assert_same(megatron_to_native(unshard_state(shards, LM), LM), native)


def test_mamba_in_proj_rank_holds_its_part_of_each_of_z_x_b_c_dt():
    native = native_state()
    full = native_to_megatron(native, LM)
    name = "decoder.layers.0.mixer.in_proj.weight"
    inner, gs, heads = LM.mamba_intermediate_size, LM.n_groups * LM.ssm_state_size, LM.mamba_num_heads
    z, x, b, c, dt = torch.split(full[name], [inner, inner, gs, gs, heads])
    rank1 = shard_state(full, LM, 1, 2)[name]
    expected = torch.cat([part.chunk(2)[1] for part in (z, x, b, c, dt)])
    assert torch.equal(rank1, expected)
    assert tp_rule("decoder.layers.0.norm.weight", LM) == ("whole",)
    assert tp_rule("decoder.layers.0.mixer.norm.weight", LM) == ("split", 0)


def test_qkv_is_laid_out_per_kv_group():
    native = native_state()
    qkv = native_to_megatron(native, LM)["decoder.layers.3.self_attention.linear_qkv.weight"]
    q, k, v = (native[f"backbone.layers.3.mixer.{x}_proj.weight"] for x in "qkv")
    hd, per_group = LM.head_dim, LM.num_attention_heads // LM.num_key_value_heads
    group1 = qkv[(per_group + 2) * hd:(per_group + 2) * hd * 2]  # [q heads 2,3 | k 1 | v 1]
    assert torch.equal(group1, torch.cat([q[per_group * hd:2 * per_group * hd], k[hd:2 * hd], v[hd:2 * hd]]))


def test_hf_to_megatron_to_hf_is_bit_exact(tmp_path):
    hf_cfg = NemotronHConfig(vocab_size=64, hidden_size=32, hybrid_override_pattern="M-M*M-*-", num_attention_heads=8,
                             num_key_value_heads=4, head_dim=8, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=8,
                             n_groups=4, intermediate_size=48, num_hidden_layers=8)
    torch.manual_seed(0)
    NemotronHForCausalLM(hf_cfg).save_pretrained(tmp_path)
    used, _ = split_carried(read_hf_weights(tmp_path))  # the names transformers writes
    native = {k.removeprefix("language_model."): v for k, v in hf_to_native_state(used).items()}
    back = megatron_to_native(unshard_state([shard_state(native_to_megatron(native, LM), LM, r, 2) for r in range(2)],
                                            LM), LM)
    again = native_to_hf_state({f"language_model.{k}": v for k, v in back.items()})
    assert_same(again, used)


def test_every_native_parameter_names_the_megatron_parameter_it_lives_in():
    from train.engines.mcore.weights import megatron_name

    native = native_state()
    full = native_to_megatron(native, LM)
    assert {megatron_name(name, LM) for name in native} == set(full)
    assert megatron_name("backbone.layers.3.mixer.k_proj.weight", LM) == "decoder.layers.3.self_attention.linear_qkv.weight"
