"""The state a text transformer carries from block to block: hidden states plus the mask.

A text encoder's blocks need the attention mask as well as the hidden states, and a
Block-KD stepping stone runs the *teacher's* blocks on the *student's* states. So a
staged text model passes :class:`TokenStates` ``(hidden, mask)`` between its stem, its
blocks and its head:

* ``hidden`` -- ``(B, L, C)`` float hidden states;
* ``mask`` -- ``(B, L)`` integer attention mask (1 = token, 0 = padding), the
  tokenizer's own 2-D mask, *not* a model's 4-D attention bias: each model builds its
  own 4-D mask from it in every block (with its own attention implementation and
  dtype), so a student and a teacher that differ there still exchange states.

It is a ``NamedTuple`` (DataParallel gathers it field by field, ``h, mask = state``
unpacks it) that also answers what Block-KD asks of a stage output:
``state.shape`` / ``.device`` / ``.dtype`` / ``.is_cuda`` (those of ``hidden``) and
``torch.cat(states)`` along the batch (both fields concatenated), through
``__torch_function__``. A connector maps ``hidden`` to the teacher's width and passes
``mask`` through (:class:`~mdistiller_blockkd.distillers.blockkd.TokenConnector`).
ViTs have no mask and carry plain ``(B, N, C)`` tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["TokenStates"]


class TokenStates(NamedTuple):
    """``(hidden (B, L, C), mask (B, L))`` between the blocks of a text transformer (see the module docstring)."""

    hidden: Tensor
    mask: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def is_cuda(self) -> bool:
        return self.hidden.is_cuda

    def with_hidden(self, hidden: Tensor) -> "TokenStates":
        """The same mask with new hidden states (a connector's output)."""
        return TokenStates(hidden, self.mask)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """``torch.cat`` of states along the batch (dim 0); every other torch function is refused."""
        kwargs = dict(kwargs or {})
        if func is torch.cat:
            parts = list(args[0])
            dim = args[1] if len(args) > 1 else kwargs.pop("dim", 0)
            if dim != 0 or kwargs or not all(isinstance(p, TokenStates) for p in parts):
                raise TypeError("TokenStates only concatenate with each other along the batch: torch.cat(states)")
            return TokenStates(torch.cat([p.hidden for p in parts]), torch.cat([p.mask for p in parts]))
        return NotImplemented
