"""The one layout of a tokenised text batch: a single LongTensor ``(B, 3, L)``.

Text models (``hf:`` encoders, :mod:`mdistiller_blockkd.models.hf_encoder`) take their
input as one integer tensor whose three rows per example are

* ``[:, 0]`` -- the token ids (``input_ids``), padded with the tokenizer's pad id;
* ``[:, 1]`` -- the attention mask (1 = a real token, 0 = padding);
* ``[:, 2]`` -- the segment ids (``token_type_ids``: 0 for the first sentence, 1 for the second).

One tensor, not a dict, so everything written for image batches carries text batches
unchanged: ``.to(device)``, DataParallel's scatter along dim 0, the distiller's
per-(device, dtype) teacher cache, the benchmark's batch slicing. The text collate
function (:class:`mdistiller_blockkd.data.text.TextCollator`) writes it and the models
read it with :func:`unpack_text_batch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["pack_text_batch", "unpack_text_batch"]


def pack_text_batch(input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
    """Stack ``(B, L)`` ids, mask and segment ids (zeros when ``None``) into one ``(B, 3, L)`` LongTensor."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be (B, L), got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    elif token_type_ids.shape != input_ids.shape:
        raise ValueError(f"token_type_ids must be (B, L) like input_ids, got {tuple(token_type_ids.shape)}")
    return torch.stack([input_ids.long(), attention_mask.long(), token_type_ids.long()], dim=1)


def unpack_text_batch(x) -> Tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, token_type_ids)`` from a packed ``(B, 3, L)`` tensor.

    A mapping with ``input_ids`` (and optionally ``attention_mask`` / ``token_type_ids``:
    a tokenizer's output) is accepted too, for direct calls to a model.
    """
    if isinstance(x, Mapping):
        ids = x["input_ids"]
        mask = x.get("attention_mask")
        types = x.get("token_type_ids")
        return (ids, torch.ones_like(ids) if mask is None else mask,
                torch.zeros_like(ids) if types is None else types)
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] != 3 or x.is_floating_point():
        got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
        raise TypeError(f"a text model takes an integer (B, 3, L) tensor of token ids, attention mask and segment "
                        f"ids (see mdistiller_blockkd.utils.text_batch), got {got}")
    return x[:, 0], x[:, 1], x[:, 2]
