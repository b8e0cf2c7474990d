"""Helpers shared by several test files (imported as ``from helpers import ...``; pytest puts
this folder on ``sys.path``)."""

import os
import sys

import torch

#: The stand-in for upstream mdistiller (its model classes, config and distiller table).
MDISTILLER_STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mdistiller_standin")


def randomize_bn(model: torch.nn.Module, seed: int = 3, shift: float = 0.2) -> None:
    """Give every ``BatchNorm2d`` of ``model`` random, reproducible statistics and affine parameters.

    Running means and biases are drawn from ``N(0, shift^2)``, running variances and weights
    from ``U(0.5, 1.5)``, all from one generator seeded with ``seed`` in module order, so an
    eval-mode BN is far from the identity (what BN folding and frozen teachers must cope with).
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * shift)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * shift)


def drop_fake_mdistiller() -> None:
    """Forget every imported ``mdistiller`` module (the stand-in's), so the next import is fresh."""
    for name in [m for m in sys.modules if m == "mdistiller" or m.startswith("mdistiller.")]:
        del sys.modules[name]
