from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_pipelines.training.batch import PackedBatch, next_token_targets
from train.config.schema import LanguageModelConfig, ModelConfig, ProjectorConfig
from train.model.language_model import HybridLanguageModel
from train.model.loss import chunked_cross_entropy
from train.model.projector import Projector, pixel_shuffle
from train.model.vlm import VisionLanguageModel

LM = LanguageModelConfig(pattern="M-M*M-M-", hidden_size=32, vocab_size=97, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
                         ssm_state_size=8, n_groups=2, chunk_size=8, mlp_hidden_size=48)


def make_lm(seed=0) -> HybridLanguageModel:
    torch.manual_seed(seed)
    lm = HybridLanguageModel(LM)
    lm.reset_parameters(torch.Generator().manual_seed(seed))
    return lm.double()


@pytest.mark.parametrize("lengths", [[1, 7, 8, 16], [13, 3, 9], [24], [5, 1, 1, 17, 6]])
def test_packed_forward_and_grads_equal_per_sample(lengths):
    lm = make_lm()
    gen = torch.Generator().manual_seed(sum(lengths))
    samples = [torch.randint(0, LM.vocab_size, (n,), generator=gen) for n in lengths]
    packed = torch.cat(samples)[None]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    logits = lm(packed, cu_seqlens=cu)
    logits.sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    singles = [lm(s[None]) for s in samples]
    torch.stack([x.sum() for x in singles]).sum().backward()
    ref = torch.cat(singles, dim=1)
    assert torch.allclose(logits, ref, rtol=1e-9, atol=1e-9)
    for name, p in lm.named_parameters():
        assert torch.allclose(packed_grads[name], p.grad, rtol=1e-7, atol=1e-9), name


def test_perturbing_one_sample_leaves_others_bit_identical():
    lm = make_lm().float()
    ids = torch.randint(0, LM.vocab_size, (1, 30))
    cu = torch.tensor([0, 10, 21, 30], dtype=torch.int32)
    base = lm(ids, cu_seqlens=cu)
    changed = ids.clone()
    changed[0, 12:18] = (changed[0, 12:18] + 1) % LM.vocab_size
    out = lm(changed, cu_seqlens=cu)
    assert torch.equal(base[:, :10], out[:, :10]) and torch.equal(base[:, 21:], out[:, 21:])
    assert not torch.equal(base[:, 10:21], out[:, 10:21])


def test_chunked_cross_entropy_equals_full():
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    chunked = chunked_cross_entropy(hidden, targets, weight, chunk_size=8)
    grads = torch.autograd.grad(chunked, (hidden, weight))
    full = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    ref = torch.autograd.grad(full, (hidden, weight))
    assert torch.allclose(chunked, full)
    assert all(torch.allclose(a, b) for a, b in zip(grads, ref))


def test_next_token_targets_never_cross_samples():
    labels = torch.tensor([[1, 2, 3, 4, 5, 6]])
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert next_token_targets(labels, seq_idx).tolist() == [[2, 3, -100, 5, -100, -100]]


def test_pixel_shuffle_groups_2x2_neighbourhoods():
    x = torch.arange(4 * 4 * 1, dtype=torch.float32).reshape(1, 4, 4, 1)
    y = pixel_shuffle(x, 0.5)
    assert y.shape == (1, 2, 2, 4)
    assert sorted(y[0, 0, 0].tolist()) == [0.0, 1.0, 4.0, 5.0]


def test_projector_input_is_four_times_vit_width():
    proj = Projector(ProjectorConfig(hidden_size=40), vision_hidden=24, lm_hidden=32)
    assert proj.mlp1[1].in_features == 96
    assert proj(torch.randn(3, 4, 4, 24)).shape == (3, 4, 32)


def test_vlm_splices_media_and_checks_counts():
    cfg = ModelConfig(language_model=LM)
    model = VisionLanguageModel(cfg, image_token_id=5)
    model.reset_parameters(0)
    tiles = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    ids = torch.randint(10, 90, (1, 20))
    ids[0, 3:11] = 5  # 2 tiles x 4 tokens
    labels = ids.clone()
    seq_idx = torch.zeros(1, 20, dtype=torch.int32)
    cu = torch.tensor([0, 20], dtype=torch.int32)
    loss, count = model(PackedBatch.build(ids, labels, seq_idx, cu, tiles))
    assert count == 19 and torch.isfinite(loss)
    loss.backward()
    assert model.vision_model.patch_embed.weight.grad is not None
    with pytest.raises(ValueError, match="media tokens"):
        model(PackedBatch.build(ids, labels, seq_idx, cu, tiles[:1]))
