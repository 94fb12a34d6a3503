"""Kernel backend choice (`model.kernels`): resolution, install hints, validation, activation checkpointing."""

from __future__ import annotations

import dataclasses
import ast
import importlib
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
               "transformer_engine": "transformer-engine"}


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
    assert cfg.model.kernels.fused == {"ssd": "mamba_ssm", "conv1d": "causal_conv1d", "attention": "flash_attn",
                                       "gated_norm": "mamba_ssm", "rms_norm": "mamba_ssm"}


@pytest.mark.parametrize(("overrides", "field"), [
    (["smoke=cpu", "model.kernels.ssd=mamba_ssm"], r"model\.kernels\.ssd=mamba_ssm runs on CUDA only"),
    (["smoke=gpu", "precision=fp32"], r"model\.kernels\.attention=flash_attn computes in bf16 only"),
    (["smoke=gpu", "model.language_model.conv_kernel=5"], r"model\.language_model\.conv_kernel 2\.\.4"),
    (["smoke=gpu", "model.language_model.ssm_state_size=15"], r"model\.kernels\.conv1d=causal_conv1d needs the conv"),
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
