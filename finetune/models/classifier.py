"""The one artifact every recipe produces: a trunk (the backbone cut at a tap) and a head.

    w, b = heads.fold(fitted_head)                       # numpy (K, D), (K,)
    model = Classifier(trunk, linear_layer(w, b))        # images (B, 3, H, W) -> scores (B, K)
    model = Classifier(trunk, KNNHead(bank, onehot, k))  # --head knn: (B, K) neighbour votes

`predict`, `evaluate` and `export` only ever see this module, whichever recipe made it. The head
is an nn.Linear (logits, or SVM scores), or a `KNNHead` whose outputs are already probabilities.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Classifier(nn.Module):
    """trunk (B, 3, H, W) -> (B, D), head (B, D) -> (B, K)."""

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class KNNHead(nn.Module):
    """Cosine k-nearest neighbours with uniform votes: features (B, D) -> class shares (B, K).

    The training features are buffers (`head.bank`, `head.onehot` in the state dict), so they are
    saved in model.safetensors and exported to ONNX as constants (MatMul, TopK, Gather).
    """

    def __init__(self, bank: torch.Tensor | np.ndarray, onehot: torch.Tensor | np.ndarray, k: int) -> None:
        super().__init__()
        self.register_buffer("bank", torch.as_tensor(np.asarray(bank, np.float32)))  # (N, D) unit rows
        self.register_buffer("onehot", torch.as_tensor(np.asarray(onehot, np.float32)))  # (N, K)
        self.k = int(k)

    @classmethod
    def empty(cls, n: int, dim: int, n_classes: int, k: int) -> KNNHead:
        """Zero buffers of the right shapes, for `load_state_dict` to fill."""
        return cls(np.zeros((n, dim), np.float32), np.zeros((n, n_classes), np.float32), k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(x.float(), dim=1)  # (B, D)
        sim = x @ self.bank.T  # (B, N) cosine similarities
        top = sim.topk(self.k, dim=1).indices  # (B, k)
        return self.onehot[top].mean(dim=1)  # (B, k, K) -> (B, K)


def linear_layer(w: np.ndarray, b: np.ndarray) -> nn.Linear:
    """nn.Linear(D, K) holding `w` (K, D) and `b` (K,) as float32."""
    linear = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w, np.float32)))
        linear.bias.copy_(torch.from_numpy(np.ascontiguousarray(b, np.float32)))
    return linear


class Mirrored(nn.Module):
    """`module` on horizontally flipped images (B, 3, H, W): test-time augmentation's second view."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(torch.flip(x, dims=(3,)))
