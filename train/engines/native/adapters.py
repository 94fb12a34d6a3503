"""Low-rank adapters on the native model (`peft=lora|dora`), through the PEFT library: its LoRA layers
wrap our `nn.Linear`s in place (`peft.inject_adapter_in_model`), so the modules, the adapter math,
DoRA, merging and the adapter file format are PEFT's, the ones users and servers load.

What PEFT cannot know is which of our linears a role names and which parts of the model train: that
is here. A part that `trainable.*` leaves trainable and that holds adapters trains its adapters only;
a trainable part without adapters trains whole (the projector of Stages 0/1 unless `peft.targets`
names it); frozen parts get no adapters.

The base's identity (`base_fingerprint`) goes into every checkpoint's marker: a checkpoint holds the
adapters and the trained parts only, so resuming or exporting it on another base would be silently
wrong; both refuse instead.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch import nn

from train.config.schema import ADAPTER_ROLES, PeftConfig, TrainableConfig

ADAPTER_NAME = "default"  # PEFT's adapter name: the one `PeftModel.from_pretrained` loads by default
ADAPTED_PARTS = ("language_model", "projector")  # the vision tower takes no adapters (yet)


def is_adapter_param(name: str) -> bool:
    """lora_A / lora_B / DoRA's lora_magnitude_vector, as PEFT names them."""
    return ".lora_" in name or name.startswith("lora_")


def target_module_names(model: nn.Module, cfg: PeftConfig, trainable: TrainableConfig) -> list[str]:
    """Full names of the linears the roles `cfg.targets` name, in the trainable parts only."""
    suffixes = tuple(s for role in cfg.targets for s in ADAPTER_ROLES[role])
    names = []
    if trainable.language_model:
        names += [f"language_model.{name}" for name, module in model.language_model.named_modules()
                  if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in suffixes]
    if "projector" in cfg.targets and trainable.projector and model.projector is not None:
        names += [f"projector.{name}" for name, module in model.projector.named_modules()
                  if isinstance(module, nn.Linear)]
    return names


def lora_config(cfg: PeftConfig, target_modules: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target_modules,
                      use_dora=cfg.method == "dora", bias="none",
                      init_lora_weights=True if cfg.init == "default" else "gaussian")


def apply_adapters(model: nn.Module, cfg: PeftConfig, trainable: TrainableConfig, seed: int) -> list[str]:
    """Wrap the targeted linears of `model` (a VisionLanguageModel, weights loaded) in PEFT LoRA layers;
    returns the adapted module names ([] when no target lies in a trainable part). The adapters'
    initialisation is drawn from `seed`, so every data-parallel rank starts with the same ones."""
    from peft import inject_adapter_in_model

    names = target_module_names(model, cfg, trainable)
    if not names:  # e.g. Stage 0 (projector only) of a `peft=lora` pipeline: that stage trains whole
        return []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(lora_config(cfg, names), model, adapter_name=ADAPTER_NAME)
    redraw_lora_a(model, cfg, seed)
    return names


def initial_lora_a(module_name: str, rank: int, in_features: int, init: str, seed: int) -> torch.Tensor:
    """The whole initial A (rank, in_features) of the adapter on `module_name` (its name in the
    vision-language model, native spelling): PEFT's distributions (`init=default`: Kaiming-uniform
    with a=sqrt(5); `gaussian`: normal with std 1/rank), drawn from a generator seeded by the run's
    seed and the module's name. Each adapter's draw depends on nothing else (not on which other
    linears are adapted, nor in what order, nor how a tensor-parallel engine splits it), so the
    native engine and megatron-core at any TP start from the same adapters. B starts at zero."""
    key = int.from_bytes(hashlib.sha256(f"{seed}/{module_name}".encode()).digest()[:8], "little") & (2**63 - 1)
    generator = torch.Generator().manual_seed(key)
    weight = torch.empty(rank, in_features)
    if init == "gaussian":
        return torch.nn.init.normal_(weight, std=1 / rank, generator=generator)
    return torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)


@torch.no_grad()
def redraw_lora_a(model: nn.Module, cfg: PeftConfig, seed: int) -> None:
    """Replace PEFT's draws of every A by `initial_lora_a` (same distribution; PEFT's depend on its
    order of injection and its version). DoRA's magnitude, computed from W + B A with B zero, stays."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            weight = module.lora_A[ADAPTER_NAME].weight
            weight.copy_(initial_lora_a(name, cfg.rank, weight.shape[1], cfg.init, seed))


def mark_trainable(model: nn.Module, trainable: TrainableConfig, adapted: list[str]) -> None:
    """`trainable.*` with adapters: a part holding adapters trains its adapter tensors only."""
    for part in ("language_model", "vision_model", "projector"):
        module = getattr(model, part)
        if module is None:
            continue
        flag = getattr(trainable, part)
        holds_adapters = any(name.startswith(part + ".") for name in adapted)
        for name, param in module.named_parameters():
            param.requires_grad_(flag and (is_adapter_param(name) if holds_adapters else True))


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen linear weights (the adapted bases, frozen parts) to the compute dtype: no fp32 copy of
    what never trains. Norms, embeddings and SSM parameters keep theirs (their math is not autocast)."""
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Linear and not module.weight.requires_grad:
                module.weight.data = module.weight.data.to(dtype)


def base_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A short identity of the base weights: names, shapes, dtypes, and per tensor an fp64 sum and a
    strided sample of its values (hashing every byte of a 12B base would take minutes at each start).
    Any retrained or re-converted base changes it."""
    return fingerprint_of({name: fingerprint_entry(name, tensor) for name, tensor in state.items()
                           if not is_adapter_param(name) and isinstance(tensor, torch.Tensor)})


def fingerprint_entry(name: str, tensor: torch.Tensor) -> bytes:
    """One whole tensor's share of `base_fingerprint` (an engine holding shards joins each tensor,
    takes its entry and lets it go: the whole model is never in memory at once)."""
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // 4096)
    sample = flat[::stride].float().cpu()
    return f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{flat.double().sum().item():.17g}|".encode() + \
        sample.numpy().tobytes()


def fingerprint_of(entries: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(entries):
        digest.update(entries[name])
    return digest.hexdigest()[:32]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors as PEFT saves them (`get_peft_model_state_dict`: adapter name dropped),
    under our module names."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def unload_adapters(model: nn.Module, merge: bool) -> nn.Module:
    """Put every adapted module's plain linear back: with `merge`, after folding the adapter into it
    (PEFT's own merge: LoRA's scaled B @ A, DoRA's renormalised direction); without, the base alone."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if merge:
                module.merge(adapter_names=[ADAPTER_NAME])
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
