"""The smoke model on CUDA with the GPU kernels against the same weights on the CPU with the torch
references: logits, loss and gradients (marked gpu; skipped without CUDA).

The model is the one every smoke run trains (configs/model/tiny.yaml: ViT, projector, hybrid LM);
the batch packs text and image samples into two rows, with sample boundaries inside SSD chunks and a
padded tail, so a kernel that leaked state across samples, misread a layout or mishandled the image
tokens would show. The reference runs in float32 on the CPU; the GPU model in float32 (mamba-ssm's
Triton kernels; the fused attention backends take 16-bit inputs only) or under bf16 autocast (every
GPU kernel, torch's own varlen attention among them). Error measure as in test_kernel_parity.py:
max |gpu - ref| / max |ref| per tensor; for a gradient, max |ref| is floored at 1e-3 of the largest
gradient of any parameter, since some are nearly zero at initialisation (a Mamba layer's dt_bias:
3e-6 against 0.26) and only rounding noise is left of them.

Cases whose id names causal_conv1d need that CUDA build (device_check.sh runs them after compiling
it). A missing backend skips its case, or fails it under REQUIRE_BACKENDS (tests/gpu/__init__.py).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import Tensor

from data_pipelines.training.packing import collate_rows
from data_pipelines.training.samples import Sample
from tests.gpu import missing_backend
from train.config.schema import KernelConfig, ModelConfig, from_dict
from train.model.vlm import VisionLanguageModel
from train.ops.dispatch import KernelUnavailableError

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
TINY = Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml"
IMAGE_TOKEN, PAD = 10, 0
SEQ_LENGTH = 160
MAMBA = dict(ssd="mamba_ssm", gated_norm="mamba_ssm", rms_norm="mamba_ssm")
# (logits, loss, gradients) bounds relative to the reference's largest magnitude.
TOL = {"fp32": (1e-2, 2e-3, 3e-2), "bf16": (5e-2, 2e-2, 1e-1)}
CASES = {  # ids naming causal_conv1d are what device_check.sh runs once that build is done
    "fp32_mamba": ("fp32", dict(MAMBA)),
    "bf16_mamba_torch_varlen": ("bf16", dict(MAMBA, attention="torch_varlen")),
    "fp32_mamba_causal_conv1d": ("fp32", dict(MAMBA, conv1d="causal_conv1d")),
    "bf16_mamba_torch_varlen_causal_conv1d": ("bf16", dict(MAMBA, attention="torch_varlen", conv1d="causal_conv1d")),
}


def smoke_model_config(**kernels: str) -> ModelConfig:
    cfg = from_dict(ModelConfig, yaml.safe_load(TINY.read_text()))
    return dataclasses.replace(cfg, kernels=KernelConfig(**kernels))


def build(cfg: ModelConfig) -> VisionLanguageModel:
    try:
        return VisionLanguageModel(cfg, image_token_id=IMAGE_TOKEN)
    except KernelUnavailableError as err:
        missing_backend(str(err))


def sample(length: int, tiles: int, tokens_per_tile: int, vocab: int, seed: int) -> Sample:
    """A sample of `length` tokens whose first `tiles` media sit after a 3-token prompt; the answer
    (second half) is supervised."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(IMAGE_TOKEN + 1, vocab, size=length)
    ids[3:3 + tiles * tokens_per_tile] = IMAGE_TOKEN
    labels = np.full(length, -100)
    labels[length // 2:] = ids[length // 2:]
    pixels = torch.from_numpy(rng.integers(0, 256, size=(tiles, 3, 64, 64), dtype=np.uint8))
    return Sample(ids, labels, pixels, "synthetic", f"s{seed}")


def packed_batch(cfg: ModelConfig):
    """Two rows of 160: [37 text | 61 with 2 tiles | 62 text] and [70 with 1 tile | 45 text | padding]."""
    per_tile, vocab = cfg.tokens_per_tile, cfg.language_model.vocab_size
    rows = [[sample(37, 0, per_tile, vocab, 1), sample(61, 2, per_tile, vocab, 2), sample(62, 0, per_tile, vocab, 3)],
            [sample(70, 1, per_tile, vocab, 4), sample(45, 0, per_tile, vocab, 5)]]
    return collate_rows(rows, SEQ_LENGTH, PAD, tile_size=cfg.vision.image_size)


def run(model: VisionLanguageModel, batch, device: torch.device, bf16: bool) -> tuple[Tensor, float, dict[str, Tensor]]:
    """Logits (B, L, V) float32 on the CPU, the mean loss, and every parameter's gradient on the CPU."""
    batch = batch.to(device)
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = model.hidden_states(batch.input_ids, batch.tiles, batch.seq_idx, batch.cu_seqlens)
        logits = model.language_model.lm_head(hidden)
        loss, count = model(batch)
    (loss / count).backward()
    grads = {name: p.grad.float().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float().cpu(), float(loss.detach()) / count, grads


GRAD_FLOOR = 1e-3


def relative(actual: Tensor, expected: Tensor, floor: float = 1e-12) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(floor)).item()


@pytest.mark.parametrize("case", list(CASES))
def test_smoke_model_on_gpu_kernels_matches_cpu_references(case):
    precision, kernels = CASES[case]
    reference = build(smoke_model_config())
    reference.reset_parameters(0)
    gpu = build(smoke_model_config(**kernels))
    gpu.load_state_dict(reference.state_dict())  # strict: the kernels change no parameter name
    gpu.to(CUDA)
    batch = packed_batch(reference.cfg)
    assert batch.tiles.shape[0] == 3 and int(batch.cu_seqlens[-1]) == 2 * SEQ_LENGTH

    logits_ref, loss_ref, grads_ref = run(reference, batch, torch.device("cpu"), bf16=False)
    logits, loss, grads = run(gpu, batch, CUDA, bf16=precision == "bf16")
    logits_tol, loss_tol, grad_tol = TOL[precision]
    assert math.isfinite(loss) and abs(loss - loss_ref) <= loss_tol * abs(loss_ref), (loss, loss_ref)
    real = batch.seq_idx.flatten() < batch.num_samples  # the padded tail's logits are not compared
    assert relative(logits.flatten(0, 1)[real], logits_ref.flatten(0, 1)[real]) <= logits_tol
    assert grads.keys() == grads_ref.keys()
    floor = GRAD_FLOOR * max(g.abs().max().item() for g in grads_ref.values())
    errors = {name: relative(grads[name], grads_ref[name], floor) for name in grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= grad_tol, f"gradient of {worst}: {errors[worst]:.3e} > {grad_tol}"
