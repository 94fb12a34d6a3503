from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipelines.training.packing import collate_rows
from data_pipelines.training.samples import Sample
from train.config.schema import Config, LanguageModelConfig, ModelConfig, OptimConfig, TrainerConfig
from train.engines.assembly import apply_trainable, build_optimizer
from train.loop.train_module import TrainModule, learning_rate
from train.model.vlm import VisionLanguageModel
from train.parallel.distributed import DistInfo
from train.precision import build_precision

LM = LanguageModelConfig(pattern="M*-", hidden_size=32, vocab_size=64, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, mamba_num_heads=2, mamba_head_dim=16, ssm_state_size=8, n_groups=1,
                         chunk_size=8, mlp_hidden_size=32)


def sample(n: int, seed: int, supervised_from: int) -> Sample:
    rng = np.random.default_rng(seed)
    ids = rng.integers(12, 64, size=n)
    labels = ids.copy()
    labels[:supervised_from] = -100
    return Sample(ids, labels, torch.zeros(0, 3, 64, 64, dtype=torch.uint8), "t", f"s{seed}")


def module(micro_batches: int, micro_batch_size: int) -> TrainModule:
    cfg = Config(stage="t", model=ModelConfig(language_model=LM),
                 optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", clip_grad=0.0),
                 trainer=TrainerConfig(max_steps=10, micro_batch_size=micro_batch_size, grad_accum_steps=micro_batches))
    model = VisionLanguageModel(cfg.model, image_token_id=10).double()
    model.reset_parameters(0)
    apply_trainable(model, cfg.trainable)
    return TrainModule(model, build_optimizer(model, cfg.optim), cfg, DistInfo(0, 1, 0, torch.device("cpu")),
                       build_precision(cfg.precision, torch.device("cpu")))


def test_accumulation_equals_one_big_batch():
    samples = [sample(n, i, s) for i, (n, s) in enumerate([(20, 5), (9, 2), (31, 20), (14, 1)])]
    accum, big = module(4, 1), module(1, 4)
    r1 = accum.train_step([collate_rows([[s]], 32, 3) for s in samples], 0)
    r2 = big.train_step([collate_rows([[s] for s in samples], 32, 3)], 0)
    assert math.isclose(r1.loss, r2.loss, rel_tol=1e-12)
    assert math.isclose(r1.grad_norm, r2.grad_norm, rel_tol=1e-10)
    # Gradients (left in .grad by the step) agree; parameters after AdamW would amplify rounding
    # where a gradient is ~0, so they are not the right thing to compare.
    for a, b in zip(accum.model.parameters(), big.model.parameters()):
        assert (a.grad is None) == (b.grad is None)  # no media here: the projector gets no gradient
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-12)


def test_packing_does_not_change_a_tokens_weight():
    samples = [sample(n, i, s) for i, (n, s) in enumerate([(10, 3), (12, 2), (9, 4)])]
    packed, unpacked = module(1, 1), module(1, 3)
    r1 = packed.train_step([collate_rows([samples], 32, 3)], 0)
    r2 = unpacked.train_step([collate_rows([[s] for s in samples], 32, 3)], 0)
    assert math.isclose(r1.loss, r2.loss, rel_tol=1e-12)
    assert r1.supervised_tokens == r2.supervised_tokens == sum(int((s.labels != -100).sum()) for s in samples)


def test_frozen_parts_stay_bit_identical():
    m = module(1, 1)
    frozen = copy.deepcopy(m.model.vision_model.state_dict())
    m.train_step([collate_rows([[sample(20, 0, 2)]], 32, 3)], 0)
    assert all(torch.equal(v, m.model.vision_model.state_dict()[k]) for k, v in frozen.items())


@pytest.mark.parametrize("step, expected", [(0, 0.25), (3, 1.0), (4, 1.0), (14, 0.1), (20, 0.1)])
def test_warmup_then_cosine(step, expected):
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4, schedule="cosine")
    assert math.isclose(learning_rate(step, cfg, max_steps=14), expected, abs_tol=1e-9)
    mid = learning_rate(9, cfg, max_steps=14)
    assert math.isclose(mid, 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def test_nonfinite_steps_are_skipped_then_stop_the_run():
    from train.loop.train_module import NonFiniteError

    m = module(1, 1)
    m.cfg.trainer.max_nonfinite_steps = 2
    batch = [collate_rows([[sample(20, 0, 2)]], 32, 3)]
    ok = m.train_step(batch, 0)
    assert not ok.skipped_nonfinite
    with torch.no_grad():
        m.model.language_model.lm_head.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    bad = m.train_step(batch, 1)
    assert bad.skipped_nonfinite and m.nonfinite_in_a_row == 1
    after = dict(m.model.named_parameters())
    assert all(torch.equal(before[n], after[n].detach()) or n.endswith("lm_head.weight") for n in before)
    with pytest.raises(NonFiniteError, match="2 steps in a row"):
        m.train_step(batch, 2)


def test_sqrt_turn_weighting():
    from data_pipelines.training.batch import token_weights

    labels = torch.tensor([[-100, 5, 6, 7, 8, -100, 9, -100, 4, 4, 4, 4]])
    seq_idx = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    w = token_weights(labels, seq_idx, "sqrt_turn")
    # turns: 4 tokens (w 1/2 each), 1 token (w 1), then a new sample's 4-token turn (w 1/2 each)
    assert w.tolist() == [[0, .5, .5, .5, .5, 0, 1, 0, .5, .5, .5, .5]]
    assert token_weights(labels, seq_idx, "token").sum() == 9


def test_sqrt_turn_step_is_the_weighted_mean():
    short, long_ = sample(8, 1, 6), sample(30, 2, 4)  # turns of 2 and 26 supervised tokens
    token, sqrt_turn = module(1, 2), module(1, 2)
    # The collator weighs the targets (trainer.loss_weighting reaches it through the batch stream).
    rows = [[short], [long_]]
    r_token = token.train_step([collate_rows(rows, 32, 3)], 0)
    r_sqrt = sqrt_turn.train_step([collate_rows(rows, 32, 3, loss_weighting="sqrt_turn")], 0)
    assert r_token.supervised_tokens == r_sqrt.supervised_tokens == 28
    # By hand, from the untrained model's per-token cross-entropy: each supervised label j is the
    # target of position j - 1; a turn of n labels weighs 1/sqrt(n) per label under sqrt_turn.
    model = module(1, 2).model
    per_token, sqrt_weights = [], []
    for s in (short, long_):
        ids = torch.from_numpy(s.input_ids).unsqueeze(0)
        with torch.no_grad():
            logits = model.language_model(ids)[0]  # (L, V), one sample
        supervised = np.flatnonzero(s.labels != -100)
        per_token += [float(F.cross_entropy(logits[j - 1], ids[0, j])) for j in supervised]
        sqrt_weights += [len(supervised) ** -0.5] * len(supervised)  # one turn per sample here
    by_hand_token = sum(per_token) / len(per_token)
    by_hand_sqrt = sum(w * l for w, l in zip(sqrt_weights, per_token)) / sum(sqrt_weights)
    assert math.isclose(r_token.loss, by_hand_token, rel_tol=1e-9)
    assert math.isclose(r_sqrt.loss, by_hand_sqrt, rel_tol=1e-6)  # the weights are float32
    assert not math.isclose(by_hand_token, by_hand_sqrt, rel_tol=1e-3)  # the weighting matters here
    # Turns of equal length weigh equally either way: the weighted mean is the plain mean.
    equal = [[sample(12, 3, 4)], [sample(20, 4, 12)]]  # two 8-token turns
    a, b = module(1, 2), module(1, 2)
    assert math.isclose(a.train_step([collate_rows(equal, 32, 3)], 0).loss,
                        b.train_step([collate_rows(equal, 32, 3, loss_weighting="sqrt_turn")], 0).loss,
                        rel_tol=1e-6)  # fp32 weights


def test_deterministic_algorithms_are_switched_on_without_loading_inductor():
    import subprocess
    import sys

    code = ("import sys, torch; from train.loop.trainer import use_deterministic_algorithms; "
            "use_deterministic_algorithms(); "
            "print(torch.are_deterministic_algorithms_enabled(), 'torch._inductor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]
