"""Kernel backend choice (`model.kernels`): resolution, install hints, validation, activation checkpointing."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from typing import get_args, get_type_hints

import pytest
import torch

from data_pipelines.training.batch import PackedBatch
from train.config.compose import list_recipes, load_config
from train.config.schema import ConfigError, KernelConfig, LanguageModelConfig, ModelConfig
from train.model.language_model import Attention, HybridLanguageModel, Mamba2Mixer, RMSNorm
from train.model.vlm import VisionLanguageModel
from train.ops import causal_conv1d_ref, gated_rms_norm_ref, rms_norm_ref, ssd_scan_ref, varlen_attention_ref
from train.ops.backends import BACKENDS, OPS
from train.ops.backends.causal_conv1d import channel_last
from train.ops.dispatch import KernelUnavailableError, load_backend, resolve_kernels

LM = LanguageModelConfig(pattern="M-*M-", hidden_size=32, vocab_size=97, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
                         ssm_state_size=8, n_groups=2, chunk_size=8, mlp_hidden_size=48)
GPU_BACKENDS = [(op, name) for op in OPS for name in BACKENDS[op] if name != "torch"]
PIP_PACKAGE = {"mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d", "flash_attn": "flash-attn",
               "torch_varlen": "torch>=2.11", "transformer_engine": "transformer-engine"}


def test_registry_matches_the_config_schema():
    hints = get_type_hints(KernelConfig)
    fields = [f.name for f in dataclasses.fields(KernelConfig) if f.name != "activation_checkpointing"]
    assert list(OPS) == fields
    for op in OPS:
        assert list(get_args(hints[op])) == list(BACKENDS[op]), op
        assert getattr(KernelConfig(), op) == "torch", "the default must be the reference"


def test_default_config_resolves_to_the_torch_references():
    kernels = resolve_kernels()
    assert (kernels.ssd, kernels.conv1d, kernels.attention, kernels.gated_norm, kernels.rms_norm) == (
        ssd_scan_ref, causal_conv1d_ref, varlen_attention_ref, gated_rms_norm_ref, rms_norm_ref)
    lm = HybridLanguageModel(LM)
    mixers = [layer.mixer for layer in lm.backbone.layers]
    assert all(m.kernels == kernels for m in mixers if isinstance(m, (Mamba2Mixer, Attention)))
    assert all(m.norm_fn is rms_norm_ref for m in lm.modules() if isinstance(m, RMSNorm))


@pytest.mark.parametrize(("op", "name"), GPU_BACKENDS)
def test_missing_gpu_library_fails_at_build_with_install_hint(op, name):
    backend = BACKENDS[op][name]
    if importlib.import_module(backend.module).IMPORT_ERROR is None:
        pytest.skip(f"{name} is installed here")
    with pytest.raises(KernelUnavailableError) as err:
        HybridLanguageModel(LM, KernelConfig(**{op: name}))
    message = str(err.value)
    assert f"model.kernels.{op}={name}" in message
    assert "pip install" in message and PIP_PACKAGE[name] in message
    assert f"set model.kernels.{op}=torch" in message
    assert isinstance(err.value, ConfigError), "the CLI prints ConfigErrors as config errors"
    assert err.value.__cause__ is not None, "the original import error stays attached"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ConfigError, match=r"model\.kernels\.ssd='triton': choose one of \['torch', 'mamba_ssm'\]"):
        load_backend("ssd", "triton")


@pytest.mark.parametrize("recipe", list_recipes())
def test_smoke_gpu_composes_with_fused_kernels(recipe):
    cfg = load_config(recipe, ["smoke=gpu"])
    assert cfg.trainer.device == "cuda" and cfg.precision.name == "bf16"
    # Nothing to compile: torch's own varlen attention, mamba-ssm's Triton kernels, the torch conv.
    assert cfg.model.kernels.fused == {"ssd": "mamba_ssm", "attention": "torch_varlen", "gated_norm": "mamba_ssm",
                                       "rms_norm": "mamba_ssm"}


@pytest.mark.parametrize(("overrides", "field"), [
    (["smoke=cpu", "model.kernels.ssd=mamba_ssm"], r"model\.kernels\.ssd=mamba_ssm runs on CUDA only"),
    (["smoke=gpu", "precision=fp32"], r"model\.kernels\.attention=torch_varlen computes in bf16 only"),
    (["smoke=gpu", "model.kernels.conv1d=causal_conv1d", "model.language_model.conv_kernel=5"],
     r"model\.language_model\.conv_kernel 2\.\.4"),
    (["smoke=gpu", "model.kernels.conv1d=causal_conv1d", "model.language_model.ssm_state_size=15"],
     r"model\.kernels\.conv1d=causal_conv1d needs the conv"),
    (["smoke=gpu", "model.language_model.head_dim=12"], r"model\.language_model\.head_dim a multiple of 8"),
    (["smoke=gpu", "model.kernels.attention=cudnn"], r"model\.kernels\.attention='cudnn': choose one of"),
])
def test_kernel_choice_is_validated_before_compute(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config("stage1_image_sft", overrides)


def test_torch_kernels_run_anywhere_the_overrides_allow():
    cfg = load_config("stage1_image_sft", ["smoke=gpu", "precision=fp32", "model.kernels.attention=torch",
                                            "model.language_model.conv_kernel=5", "model.kernels.conv1d=torch"])
    assert cfg.model.kernels.fused == {"ssd": "mamba_ssm", "gated_norm": "mamba_ssm", "rms_norm": "mamba_ssm"}


def test_channel_last_relayout_for_the_seq_idx_path():
    # The Mamba conv input is a slice of in_proj's output: channels contiguous, row stride 100 (not 8-aligned).
    proj = torch.randn(2, 7, 100)
    x = proj[..., 10:42].transpose(1, 2)  # (b=2, d=32, l=7)
    y = channel_last(x)
    assert torch.equal(y, x)
    assert y.stride(1) == 1 and y.stride(2) == 32 and y.stride(0) % 8 == 0
    aligned = torch.randn(2, 7, 32).transpose(1, 2)  # already channel-last with 8-aligned strides
    assert channel_last(aligned) is aligned


def _tiny_vlm(checkpointing: str) -> VisionLanguageModel:
    cfg = ModelConfig(language_model=LM, kernels=KernelConfig(activation_checkpointing=checkpointing))
    model = VisionLanguageModel(cfg, image_token_id=5)
    model.reset_parameters(0)
    return model


def test_activation_checkpointing_gives_identical_loss_and_grads():
    gen = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=gen)
    ids = torch.randint(10, 90, (1, 30), generator=gen)
    ids[0, 3:11] = 5  # 2 tiles x 4 tokens
    seq_idx = torch.tensor([[0] * 13 + [1] * 17], dtype=torch.int32)
    cu = torch.tensor([0, 13, 30], dtype=torch.int32)
    results = {}
    for mode in ("none", "layers"):
        model = _tiny_vlm(mode)
        calls = []
        # Hooks on each block's first norm: the recompute reruns the block's insides.
        norms = [b.norm for b in model.language_model.backbone.layers] + [b.norm1 for b in model.vision_model.blocks]
        for norm in norms:
            norm.register_forward_hook(lambda *_: calls.append(1))
        loss, count = model(PackedBatch.build(ids, ids.clone(), seq_idx, cu, tiles))
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls))
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results["none"], results["layers"]
    layers = len(LM.pattern) + ModelConfig().vision.num_layers
    assert (calls_a, calls_b) == (layers, 2 * layers), "with checkpointing every block reruns in backward"
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name] is not None and torch.equal(grads_a[name], grads_b[name]), name


def test_compiled_blocks_equal_eager_on_packed_rows_and_keep_their_names():
    """model.compile=true (`compile_blocks`): dynamo captures every block (aot_eager here: the same
    capture and autograd as inductor, without its code generation), the sample-boundary handling
    breaks the graph and runs eagerly, and two different packings give eager's loss and gradients."""
    import torch._dynamo

    from train.model.compile import compile_blocks

    gen = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=gen)
    ids = torch.randint(10, 90, (1, 40), generator=gen)
    ids[0, 3:11] = 5  # 2 tiles x 4 tokens
    eager, compiled = _tiny_vlm("none"), _tiny_vlm("none")
    names = list(compiled.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_blocks(compiled, backend="aot_eager")
    assert list(compiled.state_dict()) == names  # checkpoints and conversions see the same model
    for split in (13, 29):  # a second packing must not need another compiled graph to be right
        seq_idx = torch.tensor([[0] * split + [1] * (40 - split)], dtype=torch.int32)
        batch = PackedBatch.build(ids, ids.clone(), seq_idx, torch.tensor([0, split, 40], dtype=torch.int32), tiles)
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            loss, _ = model(batch)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
        # Compiled graphs reorder fp32 sums, so entries near zero differ by more than any elementwise
        # rtol allows while the tensor agrees: bound the error by the gradient's norm (fp32 eps ~1e-7
        # times the reduction depths here stays below 1e-5; a missing or wrong term is >= 1e-2).
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            assert float((q.grad - p.grad).norm()) <= 1e-5 * float(p.grad.norm()), name
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= len(LM.pattern)  # really compiled
    torch._dynamo.reset()
    with pytest.raises(ConfigError, match="model.compile=true compiles the native engine"):
        load_config("stage3_text_recovery", ["smoke=cpu", "model.impl=mcore", "model.compile=true"])


def test_gpu_extra_floors_are_the_deterministic_kernel_releases(project_root):
    """trainer.deterministic=true is honoured by mamba-ssm from 2.3.0 and causal-conv1d from 1.6.0."""
    import tomllib

    from packaging.requirements import Requirement

    extra = tomllib.loads((project_root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    floors = {Requirement(r).name: Requirement(r).specifier for r in extra}
    for package, last_nondeterministic, first_deterministic in (("mamba-ssm", "2.2.6.post3", "2.3.0"),
                                                                 ("causal-conv1d", "1.5.3.post1", "1.6.0")):
        assert not floors[package].contains(last_nondeterministic), f"{package} {last_nondeterministic} is allowed"
        assert floors[package].contains(first_deterministic)


def test_conv_input_slices_that_start_misaligned_are_relaid_out():
    """A slice of in_proj's output (b, l, width)[..., offset:] with aligned strides but a start that
    is not 16-byte aligned must be copied before causal-conv1d reads it with vector loads."""
    base = torch.arange(2 * 5 * 16, dtype=torch.bfloat16).reshape(2, 5, 16)
    aligned = base[:, :, 8:16].transpose(1, 2)  # starts 16 bytes in: used in place
    assert channel_last(aligned).data_ptr() == aligned.data_ptr()
    shifted = base[:, :, 1:9].transpose(1, 2)  # same strides, starts 2 bytes in
    relaid = channel_last(shifted)
    assert relaid.data_ptr() % 16 == 0 and relaid.data_ptr() != shifted.data_ptr()
    assert torch.equal(relaid, shifted) and relaid.stride(1) == 1


def test_each_gpu_library_is_imported_by_its_backend_module_only(project_root):
    """DESIGN.md's rule, checked on the source: every import of a GPU library sits in its module
    under train/ops/backends/, which every backend of that library in the table points to."""
    libraries = {"mamba_ssm", "causal_conv1d", "flash_attn", "transformer_engine"}
    importers: dict[str, set[str]] = {lib: set() for lib in libraries}
    for path in (project_root / "train").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                if name.split(".")[0] in libraries:
                    importers[name.split(".")[0]].add(str(path.relative_to(project_root)))
    assert importers == {lib: {f"train/ops/backends/{lib}.py"} for lib in libraries}
    for op in OPS:
        for name, backend in BACKENDS[op].items():
            if not backend.is_reference:
                assert backend.module == f"train.ops.backends.{name}", (op, name)


# --- model.kernels.attention=torch_varlen: torch's own varlen_attn, mapped onto each release's signature ---------
# varlen_attn has no CPU kernel (its flash kernel is CUDA-only), so the mapping is checked two ways here:
# against the installed torch's real function on meta tensors (it accepts what is passed, shapes and
# gradients come back right), and against stand-ins with the exact signatures of torch 2.11 (read from
# the 2.11.0 wheel) and 2.13 that compute what those signatures document with the reference on CPU,
# so a wrong causal flag or GQA head order shows in the numbers. tests/gpu runs the real kernel.

def _same_heads(query: torch.Tensor, key: torch.Tensor) -> None:
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"Hq={query.shape[1]} and Hkv={key.shape[1]} without GQA")


def _varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):
    """torch 2.11: q, k, v with one head count; causal iff `window_size == (-1, 0)`, as its wrapper tests it."""
    _same_heads(query, key)
    return varlen_attention_ref(query, key, value, cu_seq_q, causal=window_size == (-1, 0), softmax_scale=scale,
                                cu_seqlens_k=cu_seq_k)


def _varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch 2.13: as 2.11, plus `enable_gqa` for fewer kv heads."""
    if not enable_gqa:
        _same_heads(query, key)
    return varlen_attention_ref(query, key, value, cu_seq_q, causal=window_size == (-1, 0), softmax_scale=scale,
                                cu_seqlens_k=cu_seq_k)


def _varlen_attn_is_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, is_causal=False,
                           scale=None):
    """The 2.10 preview's form: an `is_causal` flag, no GQA."""
    _same_heads(query, key)
    return varlen_attention_ref(query, key, value, cu_seq_q, causal=is_causal, softmax_scale=scale,
                                cu_seqlens_k=cu_seq_k)


def _parameters(fn) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_torch_varlen_resolves_by_config_name_and_builds_the_model():
    from train.ops.backends import torch_varlen

    assert torch_varlen.IMPORT_ERROR is None, f"torch {torch.__version__} has varlen_attn"
    assert resolve_kernels(KernelConfig(attention="torch_varlen")).attention is torch_varlen.torch_varlen_attention
    lm = HybridLanguageModel(LM, KernelConfig(attention="torch_varlen"))
    assert all(layer.mixer.kernels.attention is torch_varlen.torch_varlen_attention
               for layer in lm.backbone.layers if isinstance(layer.mixer, Attention))
    cfg = load_config("stage3_text_recovery", ["smoke=gpu"])
    assert cfg.model.kernels.attention == "torch_varlen"


def test_torch_varlen_stand_ins_have_the_real_signatures():
    from train.ops.backends import torch_varlen

    real = _parameters(torch_varlen.varlen_attn)
    if torch.__version__.startswith("2.13"):
        assert real == _parameters(_varlen_attn_2_13)
    # Every release keeps 2.11's parameters (the GPU image's torch), in 2.11's order.
    assert real[:len(_parameters(_varlen_attn_2_11))] == _parameters(_varlen_attn_2_11)


@pytest.mark.parametrize("fn", [_varlen_attn_2_11, _varlen_attn_2_13, _varlen_attn_is_causal],
                         ids=["torch_2_11", "torch_2_13", "is_causal"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("separate_keys", [False, True])
def test_torch_varlen_maps_causality_and_gqa_onto_each_signature(fn, causal, separate_keys):
    from train.ops.backends.torch_varlen import call_varlen_attn

    gen = torch.Generator().manual_seed(0)
    hq, hkv, d = 4, 2, 8  # query head i reads kv head i // 2
    q_lengths, k_lengths = ([5, 9, 1], [12, 9, 6]) if separate_keys else ([5, 9, 1], [5, 9, 1])
    q = torch.randn(sum(q_lengths), hq, d, generator=gen, requires_grad=True)
    k, v = (torch.randn(sum(k_lengths), hkv, d, generator=gen, requires_grad=True) for _ in range(2))
    cu_q = torch.tensor([0, *q_lengths]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *k_lengths]).cumsum(0).to(torch.int32)
    out = call_varlen_attn(fn, q, k, v, cu_q, cu_k, max(q_lengths), max(k_lengths), causal, 0.3)
    expected = varlen_attention_ref(q, k, v, cu_q, causal, 0.3, cu_seqlens_k=cu_k if separate_keys else None)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for name, grad, grad_ref in zip("qkv", grads, expected_grads):
        assert grad.shape == grad_ref.shape, name  # expanded kv heads fold back to (T_k, hkv, d)
        torch.testing.assert_close(grad, grad_ref, msg=lambda m: f"d{name}: {m}")


def test_torch_varlen_call_is_accepted_by_the_installed_torch():
    """The installed torch's real varlen_attn on meta tensors: the keywords passed exist, GQA is
    accepted, and the output and gradients have the reference's shapes."""
    from train.ops.backends.torch_varlen import call_varlen_attn, varlen_attn

    meta = dict(device="meta", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = torch.empty(30, 8, 64, **meta), torch.empty(30, 2, 64, **meta), torch.empty(30, 2, 64, **meta)
    cu = torch.empty(4, device="meta", dtype=torch.int32)
    for causal in (True, False):
        out = call_varlen_attn(varlen_attn, q, k, v, cu, cu, 17, 17, causal, None)
        assert out.shape == (30, 8, 64) and out.dtype == torch.bfloat16
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


def test_torch_varlen_refuses_float32_and_cpu_tensors_with_what_to_set():
    from train.ops.backends.torch_varlen import torch_varlen_attention

    q, cu = torch.randn(6, 2, 8), torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"fp16/bf16 only, got q/k/v in torch.float32.*precision=bf16.*attention=torch"):
        torch_varlen_attention(q, q, q, cu)
    q = q.bfloat16()
    with pytest.raises(RuntimeError, match=r"attention=torch_varlen runs on CUDA tensors only.*attention=torch"):
        torch_varlen_attention(q, q, q, cu)


def test_torch_without_varlen_attn_fails_at_build_naming_the_torch_to_install(monkeypatch):
    """A torch before 2.10 has no torch.nn.attention.varlen (None in sys.modules makes its import fail
    as it would there); one whose varlen_attn cannot be asked for a causal mask is refused too."""
    import sys

    import torch.nn.attention.varlen as varlen_module

    from train.ops.backends import torch_varlen

    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "torch.nn.attention.varlen", None)
        fn, error = torch_varlen.find_varlen_attn()
    assert fn is None and isinstance(error, ImportError)
    assert "has no torch.nn.attention.varlen.varlen_attn" in str(error) and "torch >= 2.11" in str(error)
    monkeypatch.setattr(torch_varlen, "IMPORT_ERROR", error)
    with pytest.raises(KernelUnavailableError) as err:
        HybridLanguageModel(LM, KernelConfig(attention="torch_varlen"))
    message = str(err.value)
    assert "model.kernels.attention=torch_varlen" in message and "has no torch.nn.attention.varlen" in message
    assert "pip install 'torch>=2.11'" in message and "set model.kernels.attention=torch" in message
    assert err.value.__cause__ is error

    def no_causal_flag(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
        raise AssertionError("never called")

    monkeypatch.setattr(varlen_module, "varlen_attn", no_causal_flag)
    fn, error = torch_varlen.find_varlen_attn()
    assert fn is None and "takes neither window_size nor is_causal" in str(error)


def test_transformer_engine_install_hint_follows_torchs_cuda_major():
    from train.ops.backends import te_install_command

    assert te_install_command("13.0") == "pip install --no-build-isolation 'transformer-engine[core-cu13,pytorch]'"
    assert "core-cu12" in te_install_command("12.8")
