"""model.impl=mcore on GPU with the Transformer Engine spec (marked gpu; skipped without CUDA).

The TE spec (TE linears and TE's DotProductAttention, mamba-ssm scan) against the native model on
the same weights: packed rows through TE attention (THD), bf16 tolerances. One process (TP=1);
the multi-rank layouts are covered on CPU by tests/integration/test_mcore_parallel.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.gpu import import_backend
from train.config.schema import KernelConfig, LanguageModelConfig, ParallelConfig
from train.model.language_model import HybridLanguageModel
from train.engines.mcore import weights

pytestmark = pytest.mark.gpu

KERNELS = KernelConfig(ssd="mamba_ssm", conv1d="causal_conv1d", attention="transformer_engine", gated_norm="mamba_ssm")


@pytest.fixture(scope="module")
def megatron_world():
    import_backend("transformer_engine")
    from train.engines.mcore.model import initialize_megatron

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    initialize_megatron(ParallelConfig(), torch.device("cuda"))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("pattern", ["M-M-", "M-M*M-*-"])
def test_te_spec_equals_the_torch_reference_on_packed_rows_with_gradients(megatron_world, pattern):
    """TE linears and TE's THD attention (bf16) against the native model on the torch reference ops
    (float32), same weights, packed rows: logits, loss and every weight's gradient."""
    from train.engines.mcore.model import McoreLanguageModel

    lm = LanguageModelConfig(pattern=pattern, hidden_size=256, vocab_size=512, num_attention_heads=8,
                             num_key_value_heads=2, head_dim=32, mamba_num_heads=8, mamba_head_dim=32,
                             ssm_state_size=64, n_groups=2, chunk_size=64, mlp_hidden_size=512)
    reference = HybridLanguageModel(lm, KernelConfig())  # every op the torch reference
    reference.reset_parameters(torch.Generator().manual_seed(0))
    reference = reference.to("cuda", torch.float32)
    mcore = McoreLanguageModel(lm, KERNELS, ParallelConfig(), torch.device("cuda"), spec="te",
                               params_dtype=torch.bfloat16)
    weights.load_local_state(mcore.model, weights.native_to_megatron(
        {k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()}, lm))
    ids = torch.randint(0, lm.vocab_size, (1, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    cu = torch.tensor([0, 100, 357, 512], dtype=torch.int32, device="cuda")
    losses, logits = {}, {}
    for name, model in (("reference", reference), ("te", mcore)):
        out = model(ids, cu).float()  # (1, L, V)
        loss = torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:])
        loss.backward()
        losses[name], logits[name] = float(loss), out.detach()
    scale = logits["reference"].abs().max()
    assert (logits["te"] - logits["reference"]).abs().max() / scale < 3e-2
    assert losses["te"] == pytest.approx(losses["reference"], rel=1e-2)
    expected = weights.native_to_megatron({k: p.grad for k, p in reference.named_parameters()}, lm)
    got = {k: p.grad for k, p in mcore.model.named_parameters()}
    for name, grad in expected.items():
        assert got.get(name) is not None, f"no gradient reached {name}"
        err = float((got[name].float() - grad.float()).norm() / grad.float().norm())
        assert err < 5e-2, (name, err)


FP8_STAGE = ["train", "--config-name", "stage3_text_recovery", "smoke=cpu", "trainer.device=cuda", "model.impl=mcore",
             "model.kernels.attention=transformer_engine", "model.kernels.ssd=mamba_ssm",
             "model.kernels.conv1d=causal_conv1d", "model.kernels.gated_norm=mamba_ssm", "trainer.max_steps=6",
             "trainer.save_every=3", "logger.progress_bar=false"]


def fp8_state(step_dir, scratch) -> dict[str, torch.Tensor]:
    """The precision state (FP8 amax histories and scales) of a checkpoint, read without a process
    group through a one-file copy in `scratch`."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = scratch / f"{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, flat)
    return torch.load(flat, weights_only=False)["precision"]


def test_fp8_delayed_on_mcore_trains_like_bf16_and_resumes_its_scales(tmp_path):
    """precision=fp8_delayed on model.impl=mcore: megatron's FP8 (our settings through its config)
    trains within a few percent of bf16, logs the FP8 scale metrics, FP8 really runs (amaxes
    recorded, scales moved off 1 after the first step), and its amax histories and scales are in the
    checkpoint: a run resumed from step 3 repeats the uninterrupted steps."""
    import_backend("transformer_engine.pytorch")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9+")
    import shutil

    from tests.integration.helpers import read_metrics, run_module

    fp8 = ["precision=fp8_delayed", "precision.keep_first_last_layers=0", "precision.amax_history_len=4"]
    runs = {}
    for name, args in (("bf16", ["precision=bf16"]), ("fp8", fp8)):
        result = run_module([*FP8_STAGE, *args, f"run.dir={tmp_path / name}"], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = read_metrics(tmp_path / name)
    for a, b in zip(runs["fp8"], runs["bf16"]):
        assert abs(a["loss"] - b["loss"]) <= 0.05 * abs(b["loss"]), (a["loss"], b["loss"])
    assert all("fp8_scale_min" in m for m in runs["fp8"])
    # The checks above would pass with FP8 switched off (the scale state exists before any FP8 GEMM,
    # scales of 1 resume equal): FP8 must really have run. Step 1 quantises with the initial scales
    # (1); from step 2 on, the scales are those the first step's amaxes set.
    assert [m["loss"] for m in runs["fp8"]] != [m["loss"] for m in runs["bf16"]]
    assert runs["fp8"][0]["fp8_scale_min"] == runs["fp8"][0]["fp8_scale_max"] == 1.0
    assert all(m["fp8_scale_min"] != 1.0 and m["fp8_scale_max"] != 1.0 for m in runs["fp8"][1:])
    used_slots = {"fwd": 2, "bwd": 1}  # of each TE Linear: input and weight; output gradient
    state = fp8_state(tmp_path / "fp8" / "checkpoints" / "step_0000003", tmp_path)
    assert state and all(k.endswith((".amax_history", ".scale")) for k in state)
    for key, value in state.items():
        used = value[..., :used_slots[key.rsplit(".", 2)[-2]]]
        if key.endswith(".amax_history"):
            assert used.gt(0).any(dim=0).all(), f"{key}: an FP8 tensor recorded no amax in 3 steps"
        else:
            assert used.ne(1).all() and torch.isfinite(used).all(), f"{key}: scales {used.tolist()} never moved"

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fp8", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000006")
    (resumed / "checkpoints" / "latest").write_text("step_0000003\n")
    (resumed / "summary.json").unlink()
    result = run_module([*FP8_STAGE, *fp8, f"run.dir={resumed}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(read_metrics(resumed)[3:], runs["fp8"][3:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-3 * abs(b["loss"]), (a, b)
        assert a["fp8_scale_min"] == pytest.approx(b["fp8_scale_min"], rel=1e-3)
