"""What the FP8 tests share: a tiny FP8-friendly model trained step by step under a precision plugin
(the GPU tests compare Transformer Engine and torch._scaled_mm against the emulation with it), and a
counter proving the real FP8 GEMM ran."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data_pipelines.training.packing import collate_rows
from data_pipelines.training.samples import Sample
from train.config.schema import LanguageModelConfig, ModelConfig, OptimConfig, PrecisionConfig
from train.engines.assembly import build_optimizer
from train.model.vlm import VisionLanguageModel
from train.precision import build_precision

# Every FP8 Linear has in/out features divisible by 16 (Mamba in_proj: 2 * 64 + 2 * 2 * 16 + 16 = 208).
LM = LanguageModelConfig(pattern="M*-M-", hidden_size=64, vocab_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, mamba_num_heads=16, mamba_head_dim=4, ssm_state_size=16, n_groups=2,
                         chunk_size=16, mlp_hidden_size=128)


def sample(n: int, seed: int) -> Sample:
    rng = np.random.default_rng(seed)
    ids = rng.integers(12, 128, size=n)
    labels = ids.copy()
    labels[:3] = -100
    return Sample(ids, labels, torch.zeros(0, 3, 64, 64, dtype=torch.uint8), "t", f"s{seed}")


STEPS = [collate_rows([[sample(30, 2 * i)], [sample(27, 2 * i + 1)]], 32, 3) for i in range(6)]


class Run:
    """The tiny model, its precision plugin and optimizer on `device`; `step(batch)` -> loss."""

    def __init__(self, precision_cfg: PrecisionConfig, device: torch.device, seed: int = 0):
        model = VisionLanguageModel(ModelConfig(language_model=LM), image_token_id=10)
        model.reset_parameters(seed)
        self.device = device
        self.model = model.to(device)
        self.precision = build_precision(precision_cfg, device)
        self.precision.convert_model(self.model)
        self.optimizer = build_optimizer(self.model, OptimConfig(lr=3e-3))

    def step(self, b) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            loss, n = self.model(b.to(self.device))
        (loss / n).backward()
        self.precision.after_backward()
        self.optimizer.step()
        self.precision.after_optimizer_step()
        return float(loss.detach()) / n


class CountScaledMm(TorchDispatchMode):
    """Counts the aten._scaled_mm calls under it, backward included: proof the real FP8 GEMM ran."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket is torch.ops.aten._scaled_mm
        return func(*args, **(kwargs or {}))
