"""The one artifact every recipe produces: a trunk (the backbone cut at a tap) and a linear head.

    w, b = heads.fold(fitted_head)                       # numpy (K, D), (K,)
    model = Classifier(trunk, linear_layer(w, b))        # images (B, 3, H, W) -> scores (B, K)

`predict`, `evaluate` and `export` only ever see this module, whichever recipe made it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Classifier(nn.Module):
    """trunk (B, 3, H, W) -> (B, D), head (B, D) -> (B, K)."""

    def __init__(self, trunk: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def linear_layer(w: np.ndarray, b: np.ndarray) -> nn.Linear:
    """nn.Linear(D, K) holding `w` (K, D) and `b` (K,) as float32."""
    linear = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w, np.float32)))
        linear.bias.copy_(torch.from_numpy(np.ascontiguousarray(b, np.float32)))
    return linear
