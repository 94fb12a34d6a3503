"""FP8 delayed scaling through Transformer Engine (imported by `train.ops.backends.transformer_engine`).

The FP8 region's `nn.Linear`s become `te.Linear`s, forwards run under TE's FP8 autocast with a
`DelayedScaling` recipe, and TE itself records amaxes, rolls histories and updates scales (at the
exit of each autocast region for the forward tensors, at the end of each backward for the output
gradients). The scales and histories (`fp8_meta["scaling_fwd" | "scaling_bwd"]`) are this
plugin's state; they are kept out of the modules' own state dicts so parameter names stay those
of `nn.Linear`.

Importing this module needs a working Transformer Engine (it raises TE's import error otherwise);
`build_precision` imports it only for precision=fp8_delayed.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import Tensor, nn

from train.config.schema import PrecisionConfig
from train.model.recompute import set_checkpoint_fn
from train.ops.backends import transformer_engine as te_backend
from train.precision.delayed_scaling import fp8_max
from train.precision.plugin import Precision, check_state_keys, unwrap
from train.precision.region import fp8_linear_names, replace_module

if te_backend.IMPORT_ERROR is not None:  # TE's own error; `build_precision` adds the install hint
    raise te_backend.IMPORT_ERROR
te, DelayedScaling, Format = te_backend.te, te_backend.DelayedScaling, te_backend.Format

# TE's FP8 GEMMs need both matrix dims divisible by 16.
_TE_DIM_MULTIPLE = 16
# Slots of fp8_meta that TE fills for one GEMM: forward (input, weight), backward (output gradient).
_USED_SLOTS = {"fwd": 2, "bwd": 1}


def te_recipe(cfg: PrecisionConfig) -> DelayedScaling:
    # fp8_wgrad=false is rejected by PrecisionConfig.validate: TE >= 2.0 has no wgrad override.
    return DelayedScaling(margin=cfg.margin, fp8_format=Format.HYBRID if cfg.fp8_format == "hybrid" else Format.E4M3,
                          amax_history_len=cfg.amax_history_len, amax_compute_algo=cfg.amax_compute_algo)


def fp8_autocast(recipe: DelayedScaling):
    """TE's FP8 region: `te.autocast` from TE 2.9 on, `te.fp8_autocast` (deprecated since) before."""
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


class TELinear(te.Linear):
    """te.Linear without TE's pickled `_extra_state` in its state dict: the FP8 meta travels in
    the precision state instead, so the model's keys stay `weight` (and `bias`) as in nn.Linear."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state


def to_te_linear(linear: nn.Linear) -> TELinear:
    weight = linear.weight
    new = TELinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   params_dtype=weight.dtype, device=weight.device, init_method=lambda _: None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    new.weight.requires_grad_(weight.requires_grad)
    if linear.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    new.train(linear.training)
    return new


class TEFp8Precision(Precision):
    """precision=fp8_delayed."""

    def __init__(self, cfg: PrecisionConfig, device: torch.device):
        super().__init__(cfg, device)
        if device.type != "cuda":
            raise RuntimeError(f"precision=fp8_delayed runs on CUDA (got device {device}); "
                               "use precision=fp8_delayed_emulated on CPU")
        self.recipe = te_recipe(cfg)
        self.modules: dict[str, TELinear] = {}
        backward_max = fp8_max(torch.float8_e5m2 if cfg.fp8_format == "hybrid" else torch.float8_e4m3fn)
        self._max_per_slot = {"fwd": fp8_max(torch.float8_e4m3fn), "bwd": backward_max}
        self._scales_in_use: Tensor | None = None
        self._stats: dict[str, Tensor] = {}

    def convert_model(self, model: nn.Module) -> nn.Module:
        """Swap the FP8 region's Linears for te.Linear. New Parameter objects (values copied):
        call this before building the optimizer and before DDP."""
        if self.modules:
            raise RuntimeError("convert_model was already called; one Precision converts one model")
        names = fp8_linear_names(model, self.cfg.keep_patterns, self.cfg.keep_first_last_layers)
        linears = {n: model.get_submodule(n) for n in names}
        off_gpu = [n for n, m in linears.items() if m.weight.device.type != "cuda"]
        if off_gpu:
            raise RuntimeError(f"move the model to the GPU before convert_model ({off_gpu[0]} is not on CUDA)")
        odd = [f"{n} ({m.out_features}x{m.in_features})" for n, m in linears.items()
               if m.in_features % _TE_DIM_MULTIPLE or m.out_features % _TE_DIM_MULTIPLE]
        if odd:
            raise ValueError(f"Transformer Engine's FP8 GEMMs need in/out features divisible by {_TE_DIM_MULTIPLE}; "
                             f"{len(odd)} Linear(s) are not, e.g. {odd[:3]}: add them to precision.keep_patterns "
                             "or use precision=fp8_delayed_emulated")
        for name, linear in linears.items():
            self.modules[name] = to_te_linear(linear)
            replace_module(model, name, self.modules[name])
        # Allocate TE's FP8 meta now (TE would on the first FP8 forward) so a checkpoint can be
        # loaded into it before training; no_grad keeps the autocast exit from updating scales.
        with torch.no_grad(), fp8_autocast(self.recipe):
            for module in self.modules.values():
                module.init_fp8_metadata()
        self._scales_in_use = self._used("scale")
        # TE's own checkpoint reruns a layer inside FP8 with the forward's scales (torch's would
        # rerun it outside the FP8 autocast). Non-reentrant, as everywhere else: TE's reentrant default
        # breaks DDP with find_unused_parameters ("mark a variable ready only once") and drops the
        # gradients of a layer whose input needs none.
        set_checkpoint_fn(model, functools.partial(te.checkpoint, use_reentrant=False))
        return model

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with super().autocast(), fp8_autocast(self.recipe):
            yield

    def _meta(self, module: TELinear, mode: str):
        return module.fp8_meta[f"scaling_{mode}"]

    def _used(self, what: str) -> Tensor:
        """Scales ("scale") or newest recorded amaxes ("amax") of every used slot, flat."""
        parts = []
        for module in self.modules.values():
            for mode, n in _USED_SLOTS.items():
                meta = self._meta(module, mode)
                parts.append(meta.scale[:n] if what == "scale" else meta.amax_history[-1, :n])
        return torch.cat(parts)

    def _max_values(self) -> Tensor:
        per_module = [self._max_per_slot[mode] for mode, n in _USED_SLOTS.items() for _ in range(n)]
        return torch.tensor(per_module * len(self.modules), dtype=torch.float32, device=self.device)

    def after_optimizer_step(self) -> None:
        """TE has already updated the scales; estimate which tensors clipped during the step
        from the newest amax against the scale it was quantised with."""
        if not self.modules:
            return
        used = self._scales_in_use
        saturated = self._used("amax") * used > self._max_values()
        self._stats = {"fp8_saturated_frac": saturated.float().mean(), "fp8_scale_min": used.min(),
                       "fp8_scale_max": used.max()}
        self._scales_in_use = self._used("scale")

    def step_metrics(self) -> dict[str, float]:
        return {key: float(value) for key, value in self._stats.items()}

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for name, module in self.modules.items():
            for mode in _USED_SLOTS:
                meta = self._meta(module, mode)
                out[f"{name}.{mode}.amax_history"] = meta.amax_history.clone()  # (len, slots)
                out[f"{name}.{mode}.scale"] = meta.scale.clone()  # (slots,)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        check_state_keys(self.state_dict(), state)
        with torch.no_grad():
            for name, module in self.modules.items():
                for mode in _USED_SLOTS:
                    # In place: TE's amax-reduction buffers hold views of these very tensors.
                    meta = self._meta(module, mode)
                    meta.amax_history.copy_(state[f"{name}.{mode}.amax_history"])
                    meta.scale.copy_(state[f"{name}.{mode}.scale"])
        self._scales_in_use = self._used("scale")

    def fp8_module_names(self, model: nn.Module) -> list[str]:
        return [name for name, m in unwrap(model).named_modules() if isinstance(m, TELinear)]
