"""FP8 delayed scaling on the megatron-core engine (`model.impl=mcore`, precision=fp8_delayed).

megatron-core runs FP8 itself: its config carries our settings (`train.engines.mcore.model.fp8_fields`),
its TE spec builds Transformer Engine linears in every language-model layer, and its hybrid stack
enters TE's FP8 context (with the amax-reduction group of the layout) around the decoder pass. So
this plugin swaps nothing and adds only bf16 autocast around the forward; what it keeps is the
state: the scales and amax histories of those TE linears, under layout-independent names (a
pipeline stage's layers under their whole-model numbers; tensor-parallel peers hold equal copies,
their amaxes reduced together), so FP8 state resumes at another layout as the weights do.

Importing this module needs a working Transformer Engine (see `train.precision.fp8_te`).
"""

from __future__ import annotations

from typing import ContextManager

import torch
from torch import nn

from train.precision.fp8_te import TEFp8Precision, fp8_autocast, te
from train.precision.plugin import Precision, unwrap

_MEGATRON = "language_model.model."


class McoreFp8Precision(TEFp8Precision):
    def convert_model(self, model: nn.Module) -> nn.Module:
        """Collect the TE linears megatron built (no swap) and allocate their FP8 meta, so a
        checkpoint can be loaded into it before the first step."""
        if self.modules:
            raise RuntimeError("convert_model was already called; one Precision converts one model")
        lm = model.language_model
        for name, module in model.named_modules():
            if isinstance(module, te.Linear):
                self.modules[_MEGATRON + lm.global_name(name.removeprefix(_MEGATRON))] = module
        if not self.modules:
            raise RuntimeError("precision=fp8_delayed with model.impl=mcore found no Transformer Engine linears: "
                               "build the language model with the TE spec (model.kernels.attention=transformer_engine)")
        with torch.no_grad(), fp8_autocast(self.recipe):
            for module in self.modules.values():
                module.init_fp8_metadata()
        self._scales_in_use = self._used("scale")
        return model

    def autocast(self) -> ContextManager:
        # bf16 around the whole forward; megatron's hybrid stack enters the FP8 context itself.
        return Precision.autocast(self)

    def fp8_module_names(self, model: nn.Module) -> list[str]:
        return [name for name, m in unwrap(model).named_modules() if isinstance(m, te.Linear)]
