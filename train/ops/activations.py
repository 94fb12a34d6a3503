"""The squared ReLU of Nemotron-H's MLP, relu(x)^2, as one autograd Function.

Autograd's relu -> square keeps relu's output and, in backward, makes three activation-sized
tensors (2 * r, g * 2r, and relu's masked gradient). Here backward is one multiply on relu's
output, which is already zero where the mask would zero the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["squared_relu"]


def squared_relu(x: Tensor) -> Tensor:
    """relu(x)^2, elementwise, in x's dtype."""
    return _SquaredReLU.apply(x)


class _SquaredReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        positive = torch.relu(x)
        ctx.save_for_backward(positive)
        return positive.square()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (positive,) = ctx.saved_tensors
        return (grad * positive).mul_(2.0)  # d relu(x)^2 / dx = 2 relu(x)
