"""FP8 delayed scaling in plain torch, without Transformer Engine: on CPU or GPU, numerically TE-like.

Each FP8 Linear quantises its input and weight to E4M3 in the forward and its output gradient to
E5M2 (hybrid) or E4M3 in the backward, with the delayed scales of `DelayedScalingState`, and runs
the GEMMs on the FP8 values with the two inverse scales applied to the product, as cuBLAS applies
them to an FP8 GEMM. `precision.fp8_gemm` picks the GEMM (`train.precision.fp8_gemm`): `emulated`
multiplies the FP8 values in float32 (deterministic, anywhere), `scaled_mm` runs real FP8 GEMMs
through `torch._scaled_mm`; quantisation, scaling state and checkpoint keys are the same for both.
With `fp8_wgrad` off the weight-gradient GEMM uses the unquantised input and output gradient instead.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from train.config.schema import PrecisionConfig
from train.model.recompute import set_checkpoint_fn
from train.precision.delayed_scaling import DelayedScalingRecipe, DelayedScalingState
from train.precision.fp8_gemm import FP8_GEMMS, Fp8Gemm, check_scaled_mm
from train.precision.plugin import Precision, check_state_keys, unwrap
from train.precision.region import fp8_linear_names, replace_module

# Columns of one Linear in the state: forward (input, weight), backward (output gradient).
_FWD, _BWD = (0, 1), (2,)


def recipe_from_config(cfg: PrecisionConfig) -> DelayedScalingRecipe:
    return DelayedScalingRecipe(fp8_format=cfg.fp8_format, amax_history_len=cfg.amax_history_len,
                                amax_compute_algo=cfg.amax_compute_algo, margin=cfg.margin,
                                fp8_wgrad=cfg.fp8_wgrad)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, state: DelayedScalingState,
                cols: tuple[int, int, int], out_dtype: torch.dtype, gemm: Fp8Gemm) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (T, K)
        with torch.autocast(x.device.type, enabled=False):
            x_fp8, x_inv = state.quantize(x2, cols[0])
            w_fp8, w_inv = state.quantize(weight, cols[1])
            if bias is None:
                out = gemm(x_fp8, w_fp8.t(), x_inv, w_inv, out_dtype)  # (T, N)
            else:
                # The bias joins in float32 before the one rounding to out_dtype, as a GEMM's bias epilogue.
                out = (gemm(x_fp8, w_fp8.t(), x_inv, w_inv, torch.float32) + bias.float()).to(out_dtype)
        wgrad_input = x_fp8 if state.recipe.fp8_wgrad else x2
        ctx.save_for_backward(wgrad_input if weight.requires_grad else None, w_fp8, x_inv, w_inv)
        ctx.state, ctx.cols, ctx.gemm = state, cols, gemm
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        wgrad_input, w_fp8, x_inv, w_inv = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # (T, N)
        grad_x = grad_w = grad_b = None
        gemm = ctx.gemm
        with torch.autocast(grad_out.device.type, enabled=False):
            g_fp8, g_inv = ctx.state.quantize(g2, ctx.cols[2])
            if ctx.needs_input_grad[0]:
                grad_x = gemm(g_fp8, w_fp8, g_inv, w_inv, x_dtype)  # (T, K)
                grad_x = grad_x.reshape(*grad_out.shape[:-1], grad_x.shape[-1])
            if ctx.needs_input_grad[1]:
                if ctx.state.recipe.fp8_wgrad:
                    grad_w = gemm(g_fp8.t(), wgrad_input, g_inv, x_inv, w_dtype)  # (N, K)
                else:
                    grad_w = (g2.float().t() @ wgrad_input.float()).to(w_dtype)
            if ctx.needs_input_grad[2]:
                # The bias gradient comes from the unquantised output gradient, as in TE.
                grad_b = g2.float().sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


class Fp8EmulatedLinear(nn.Linear):
    """An nn.Linear whose GEMMs run on FP8-quantised operands (by `gemm`: emulated in float32 or
    torch._scaled_mm); the same Parameter objects under the same names, so optimizers, checkpoints
    and HF conversion see no difference."""

    state: DelayedScalingState
    columns: tuple[int, int, int]
    gemm_name: str  # a key of FP8_GEMMS
    gemm: Fp8Gemm

    @classmethod
    def from_linear(cls, linear: nn.Linear, state: DelayedScalingState, columns: tuple[int, int, int],
                    gemm: str = "emulated") -> "Fp8EmulatedLinear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        new.state, new.columns = state, columns
        new.gemm_name, new.gemm = gemm, FP8_GEMMS[gemm]
        return new

    def forward(self, x: Tensor) -> Tensor:
        # As Transformer Engine 2.x (`_Linear.forward`): the incoming activation is quantised in its
        # own dtype, not cast to the activation dtype first; the output comes in the activation
        # dtype (autocast's, if on).
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return _Fp8Linear.apply(x, self.weight, self.bias, self.state, self.columns, out_dtype, self.gemm)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8_gemm={self.gemm_name}"


class EmulatedFp8Precision(Precision):
    """precision=fp8_delayed_emulated, with `precision.fp8_gemm` choosing the GEMMs."""

    def __init__(self, cfg: PrecisionConfig, device: torch.device):
        super().__init__(cfg, device)
        self.recipe = recipe_from_config(cfg)
        self.names: list[str] = []
        self.state = DelayedScalingState(self.recipe, [], device)
        self._stats: dict[str, Tensor] = {}

    def convert_model(self, model: nn.Module) -> nn.Module:
        if self.names:
            raise RuntimeError("convert_model was already called; one Precision converts one model")
        self.names = fp8_linear_names(model, self.cfg.keep_patterns, self.cfg.keep_first_last_layers)
        fwd, bwd = self.recipe.forward_dtype, self.recipe.backward_dtype
        device = model.get_submodule(self.names[0]).weight.device if self.names else self.device
        if self.cfg.fp8_gemm == "scaled_mm" and self.names:
            self._check_scaled_mm(model, device)
        self.state = DelayedScalingState(self.recipe, [fwd, fwd, bwd] * len(self.names), device)
        for i, name in enumerate(self.names):
            columns = (3 * i, 3 * i + 1, 3 * i + 2)
            replace_module(model, name, Fp8EmulatedLinear.from_linear(model.get_submodule(name), self.state, columns,
                                                                      self.cfg.fp8_gemm))
        # A checkpointed layer reruns in backward after the autocast exit moved the scales on.
        set_checkpoint_fn(model, self._recompute)
        n = len(self.names)
        self._forward_columns = torch.tensor([3 * i + c for i in range(n) for c in _FWD], device=device)
        self._backward_columns = torch.tensor([3 * i + c for i in range(n) for c in _BWD], device=device)
        return model

    def _check_scaled_mm(self, model: nn.Module, device: torch.device) -> None:
        """Before any step: every FP8 Linear's shape, and the device's FP8 GEMM for each operand
        pairing (forward: input x weight; backward: output gradient x weight or input) and each
        output dtype the Linear asks for (the compute dtype, float32 under a bias)."""
        linears = {name: model.get_submodule(name) for name in self.names}
        features = {name: (m.out_features, m.in_features) for name, m in linears.items()}
        fwd, bwd = self.recipe.forward_dtype, self.recipe.backward_dtype
        out_dtypes = [torch.float32] + ([torch.bfloat16] if self.cfg.resolved_compute_dtype == "bf16" else [])
        check_scaled_mm(features, device, [(fwd, fwd), (bwd, fwd)], out_dtypes)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The compute-dtype autocast; on exit in training the forward tensors' scales update, as
        Transformer Engine's `fp8_autocast` updates them (once per micro-batch)."""
        with super().autocast():
            yield
        if self.state.num_tensors and torch.is_grad_enabled():
            self.state.update(self._forward_columns)

    def _recompute(self, function, *args):
        """Recompute a layer in backward with the scales its forward used, recording nothing (its
        amaxes were recorded in the forward), as Transformer Engine's checkpoint does."""
        return checkpoint(function, *args, use_reentrant=False, context_fn=self._forward_scales)

    def _forward_scales(self):
        used = self.state.scale.clone()  # at the layer's forward

        @contextlib.contextmanager
        def replay():
            current = self.state.scale.clone()
            self.state.scale.copy_(used)
            self.state.recording = False
            try:
                yield
            finally:
                self.state.scale.copy_(current)
                self.state.recording = True

        return contextlib.nullcontext(), replay()

    def after_backward(self) -> None:
        if self.state.num_tensors:
            self.state.update(self._backward_columns)

    def after_optimizer_step(self) -> None:
        if self.state.num_tensors:
            self._stats = self.state.stats()

    def step_metrics(self) -> dict[str, float]:
        return {key: float(value) for key, value in self._stats.items()}

    def _columns(self) -> dict[str, list[int]]:
        cols = {}
        for i, name in enumerate(self.names):
            cols[f"{name}.fwd"] = [3 * i + c for c in _FWD]
            cols[f"{name}.bwd"] = [3 * i + c for c in _BWD]
        return cols

    def state_dict(self) -> dict[str, Tensor]:
        out = {}
        for prefix, cols in self._columns().items():
            out[f"{prefix}.amax_history"] = self.state.amax_history[:, cols].clone()  # (len, len(cols))
            out[f"{prefix}.scale"] = self.state.scale[cols].clone()
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        check_state_keys(self.state_dict(), state)
        with torch.no_grad():
            for prefix, cols in self._columns().items():
                self.state.amax_history[:, cols] = state[f"{prefix}.amax_history"].to(self.state.amax_history.device)
                self.state.scale[cols] = state[f"{prefix}.scale"].to(self.state.scale.device)

    def fp8_module_names(self, model: nn.Module) -> list[str]:
        return [name for name, m in unwrap(model).named_modules() if isinstance(m, Fp8EmulatedLinear)]
