"""Every reference op runs in bf16 and fp16, given tensors in that dtype and under autocast over
float32 tensors (what `precision=bf16` does), forward and backward on packed rows, and agrees with
its float32 run on the same rounded inputs within the dtype's rounding."""

from __future__ import annotations

import contextlib

import pytest
import torch

from train.config.schema import LanguageModelConfig
from train.model.language_model import HybridLanguageModel
from train.ops import causal_conv1d_ref, gated_rms_norm_ref, rms_norm_ref, ssd_scan_ref, varlen_attention_ref

L = 40
SEQ_IDX = torch.tensor([[0] * 13 + [1] * 27], dtype=torch.int32)
CU = torch.tensor([0, 13, L], dtype=torch.int32)
# max |low - fp32| / max |fp32| allowed, per tensor: a few roundings of the output dtype.
TOL = {torch.bfloat16: 4e-2, torch.float16: 8e-3}


def _inputs(gen: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    return {
        "conv1d": dict(x=r(1, 64, L), weight=r(64, 4, scale=0.5), bias=r(64)),
        "ssd": dict(x=r(1, L, 4, 8), dt=r(1, L, 4), A=-torch.rand(4, generator=gen) - 0.5, B=r(1, L, 2, 8),
                    C=r(1, L, 2, 8), D=r(4), dt_bias=r(4)),
        "rms_norm": dict(x=r(1, L, 64), weight=r(64)),
        "gated_rms_norm": dict(x=r(1, L, 64), z=r(1, L, 64), weight=r(64)),
        "attention": dict(q=r(L, 4, 16), k=r(L, 2, 16), v=r(L, 2, 16)),
    }


CALLS = {
    "conv1d": lambda t: causal_conv1d_ref(t["x"], t["weight"], t["bias"], SEQ_IDX, activation="silu"),
    "ssd": lambda t: ssd_scan_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=t["D"], dt_bias=t["dt_bias"],
                                  seq_idx=SEQ_IDX, dt_softplus=True),
    "rms_norm": lambda t: rms_norm_ref(t["x"], t["weight"]),
    "gated_rms_norm": lambda t: gated_rms_norm_ref(t["x"], t["z"], t["weight"], group_size=32),
    "attention": lambda t: varlen_attention_ref(t["q"], t["k"], t["v"], CU),
}


def _run(op: str, tensors: dict[str, torch.Tensor], autocast: torch.dtype | None):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        out = CALLS[op](leaves)
    out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype))
    return out, {k: v.grad for k, v in leaves.items()}


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    got, want = got.detach().float(), want.detach().float()
    err = float((got - want).abs().max())
    assert err <= tol * float(want.abs().max()), f"{what}: {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["tensors", "autocast"])
@pytest.mark.parametrize("op", list(CALLS))
def test_reference_op_in_low_precision(op, dtype, mode):
    # Activations in the low dtype; parameters of the op (A, D, dt_bias, norm weights) stay float32 as
    # the model keeps them; under autocast everything is float32 and autocast decides.
    rounded = {k: v.to(dtype).float() for k, v in _inputs(torch.Generator().manual_seed(0))[op].items()}
    params = {"A", "D", "dt_bias", "weight", "bias"} if op != "conv1d" else set()
    low = {k: v if (mode == "autocast" or k in params) else v.to(dtype) for k, v in rounded.items()}
    out, grads = _run(op, low, dtype if mode == "autocast" else None)
    want, want_grads = _run(op, rounded, None)
    assert out.dtype == next(iter(low.values())).dtype  # the activations' dtype, as the kernels return
    assert torch.isfinite(out).all()
    _close(out, want, TOL[dtype], f"{op} output")
    for name, grad in grads.items():
        assert grad.dtype == low[name].dtype, name
        _close(grad, want_grads[name], 2 * TOL[dtype], f"{op} d{name}")


def test_hybrid_lm_trains_under_bf16_autocast_on_packed_rows():
    """What precision=bf16 runs: float32 parameters, the forward under autocast, on a packed row."""
    cfg = LanguageModelConfig(pattern="M-M*", hidden_size=32, vocab_size=64, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
                              ssm_state_size=8, n_groups=2, chunk_size=8, mlp_hidden_size=48)
    model = HybridLanguageModel(cfg)
    model.reset_parameters(torch.Generator().manual_seed(0))
    ids = torch.randint(0, 64, (1, L), generator=torch.Generator().manual_seed(1))
    losses, grads = {}, {}
    for mode in ("fp32", "bf16"):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            logits = model(ids, cu_seqlens=CU)
        loss = torch.nn.functional.cross_entropy(logits.float()[0, :-1], ids[0, 1:])
        loss.backward()
        losses[mode] = float(loss)
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    assert float((grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm()) < 5e-2
