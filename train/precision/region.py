"""Which Linear modules run in FP8: every plain `nn.Linear` outside the kept region.

The kept region is a list of fnmatch patterns over module names (a module is kept when its name or
an ancestor's matches) plus the first and last N language-model layers. Megatron refuses its
first/last-layers-BF16 option together with delayed scaling; here the region is simply ours to
choose, so both work together.
"""

from __future__ import annotations

import re
import warnings
from fnmatch import fnmatchcase

from torch import nn

LM_LAYERS_PREFIX = "language_model.backbone.layers."
_LAYER = re.compile(re.escape(LM_LAYERS_PREFIX) + r"(\d+)(?:\.|$)")


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _layer_index(name: str) -> int | None:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def fp8_linear_names(model: nn.Module, keep_patterns: list[str], keep_first_last_layers: int) -> list[str]:
    """Names of the modules to run in FP8, in module order.

    Only exact `nn.Linear` qualifies: subclasses (already converted ones, or attention's
    out_proj whose weight is used directly) have their own forward and are left alone.
    """
    names = [name for name, _ in model.named_modules()]
    num_layers = 1 + max((i for i in map(_layer_index, names) if i is not None), default=-1)
    n = keep_first_last_layers
    kept_layers = set(range(min(n, num_layers))) | set(range(max(num_layers - n, 0), num_layers))
    unmatched = [p for p in keep_patterns if not any(fnmatchcase(name, p) for name in names)]
    if unmatched:
        warnings.warn(f"precision.keep_patterns {unmatched} match no module of {type(model).__name__}")
    chosen = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if any(fnmatchcase(a, p) for a in _ancestors(name) for p in keep_patterns):
            continue
        if _layer_index(name) in kept_layers:
            continue
        chosen.append(name)
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
