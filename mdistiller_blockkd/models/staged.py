"""The staged-model protocol shared by every model in the toolbox.

A *staged model* is ``stem -> block_1 -> ... -> block_n -> head``. Every model
(CIFAR zoo, timm wrapper) is written once against :class:`StagedModel`, and gets
from it, for free:

* the mdistiller forward contract ``forward(x) -> (logits, feats)`` with
  ``feats["feats"]`` (stem output, then every block output),
  ``feats["preact_feats"]`` (the same before each block's last ReLU) and
  ``feats["pooled_feat"]`` (the vector fed to the classifier);
* timm-style ``forward_features`` / ``forward_head`` and ``feature_info``;
* :meth:`StagedModel.staged_view`, the model-agnostic view that Block-KD splices
  stepping stones from (student stem + blocks 1..i, connector, teacher blocks
  i+1..n, teacher head) and that ReviewKD reads shapes from.

A subclass implements these things:

``forward_stem(x) -> (out, preact)``
    the stem; ``out`` is ``feats[0]``.
``forward_block(i, h) -> (out, preact)``
    block ``i`` (0-based, ``0 <= i < num_blocks``) applied to the previous output;
    :meth:`StagedModel.check_block_index` and :meth:`StagedModel.run_preact_blocks`
    help write it.
``forward_head(h, pre_logits=False)``
    everything after the last block: optional extra layers, pooling, classifier.
    Returns the pooled vector when ``pre_logits`` is True, else the logits. The
    default is global average pooling then ``get_classifier()``; a model with extra
    layers calls ``super().forward_head(extra(h), pre_logits)``.
``get_classifier()``
    the final classifier module.
``feature_info``
    a list of ``{"num_chs", "reduction", "module"}`` dicts, one for the stem then one
    per block, describing each output (channels, down-sampling factor w.r.t. the input),
    with ``"kind": "tokens"`` for transformers (see :class:`StageInfo`).

and sets ``self.num_blocks``. No method may keep state between calls: the stone
forward calls ``forward_block`` of a frozen teacher on student features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class StageInfo:
    """Shape of one stage output: channels and down-sampling factor (output stride).

    ``kind`` is ``"map"`` for a CNN's ``(N, C, H, W)`` feature map, ``"tokens"`` for a
    transformer's token sequence (``num_chs`` = hidden size; ``reduction`` = the patch
    size of a ViT, 1 for text), carried as a ``(N, L, C)`` tensor or, with an attention
    mask, as :class:`~mdistiller_blockkd.models.tokens.TokenStates`.
    """

    num_chs: int
    reduction: int
    module: str = ""
    kind: str = "map"


class StagedView:
    """A model seen as ``stem``, an ordered list of ``blocks`` and a ``head``.

    ``stem(x)``, ``blocks[i](h)`` and ``head(h)`` are plain callables returning
    tensors (a text transformer's stages return :class:`~.tokens.TokenStates`, hidden
    states with their attention mask); running them in order reproduces the model's
    logits exactly.
    ``stem_info`` and ``block_info[i]`` describe the stem and block outputs.
    """

    def __init__(self, model: "StagedModel"):
        self.model = model
        info = [StageInfo(d["num_chs"], d["reduction"], d.get("module", ""), d.get("kind", "map"))
                for d in model.feature_info]
        if len(info) != model.num_blocks + 1:
            raise ValueError(
                f"{type(model).__name__}.feature_info has {len(info)} entries, expected "
                f"stem + {model.num_blocks} blocks"
            )
        self.stem_info: StageInfo = info[0]
        self.block_info: List[StageInfo] = info[1:]

    @property
    def num_blocks(self) -> int:
        return len(self.block_info)

    def stem(self, x: Tensor) -> Tensor:
        return self.model.forward_stem(x)[0]

    def block(self, i: int, h: Tensor) -> Tensor:
        return self.model.forward_block(i, h)[0]

    @property
    def blocks(self) -> List[Callable[[Tensor], Tensor]]:
        return [(lambda h, i=i: self.block(i, h)) for i in range(self.num_blocks)]

    def head(self, h: Tensor) -> Tensor:
        return self.model.forward_head(h)

    def forward_from(self, h: Tensor, start: int) -> Tensor:
        """Logits from the output of block ``start - 1`` (``start = 0``: from the stem output)."""
        for i in range(start, self.num_blocks):
            h = self.block(i, h)
        return self.head(h)

    def block_outputs(self, x: Tensor) -> List[Tensor]:
        """Outputs of every block (not the stem), shallow to deep."""
        h = self.stem(x)
        outs = []
        for i in range(self.num_blocks):
            h = self.block(i, h)
            outs.append(h)
        return outs

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward_from(self.stem(x), 0)


class StagedModel(nn.Module):
    """Base class of every model: see the module docstring for the protocol."""

    num_blocks: int = 0
    feature_info: Sequence[dict] = ()

    # --- to implement -------------------------------------------------------------
    def forward_stem(self, x: Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_block(self, i: int, h: Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def get_classifier(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- defaults and helpers for subclasses -----------------------------------------
    def forward_head(self, h: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pooling, then ``get_classifier()`` (skipped when ``pre_logits``)."""
        pooled = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return pooled if pre_logits else self.get_classifier()(pooled)

    def check_block_index(self, i: int) -> None:
        """Raise ``IndexError`` unless ``0 <= i < num_blocks``."""
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block index {i} out of range for {self.num_blocks} blocks")

    @staticmethod
    def run_preact_blocks(blocks: Iterable[nn.Module], h: Tensor):
        """Run ``blocks`` (each returning ``(out, preact)``) in order on ``h``.

        Returns the last block's ``(out, preact)`` (``(h, None)`` when there is none).
        """
        pre = None
        for blk in blocks:
            h, pre = blk(h)
        return h, pre

    # --- provided -----------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """Output of the last block (before the head)."""
        h = self.forward_stem(x)[0]
        for i in range(self.num_blocks):
            h = self.forward_block(i, h)[0]
        return h

    def forward(self, x: Tensor):
        """mdistiller contract: ``(logits, {"feats", "preact_feats", "pooled_feat"})``."""
        h, pre = self.forward_stem(x)
        feats, preacts = [h], [pre]
        for i in range(self.num_blocks):
            h, pre = self.forward_block(i, h)
            feats.append(h)
            preacts.append(pre)
        pooled = self.forward_head(h, pre_logits=True)
        logits = self.classifier_forward(pooled)
        return logits, {"feats": feats, "preact_feats": preacts, "pooled_feat": pooled}

    def classifier_forward(self, pooled: Tensor) -> Tensor:
        """Map the pooled vector to logits (``forward_head(h) == classifier_forward(forward_head(h, True))``)."""
        return self.get_classifier()(pooled)

    def staged_view(self) -> StagedView:
        return StagedView(self)

    def stage_channels(self) -> List[int]:
        """Channels of the stem and of every block output (mdistiller's ``get_stage_channels``)."""
        return [d["num_chs"] for d in self.feature_info]


def outputs_close(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` have one shape, are finite and agree up to float rounding
    (relative 1e-4, absolute 1e-5 of ``b``'s largest magnitude): the staging checks of the wrappers."""
    if a.shape != b.shape:
        return False
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def probe_feature_shapes(model: nn.Module, input_size=(3, 32, 32)):
    """Run one dummy batch of 2 and return the shapes (C, H, W) of ``feats["feats"]``."""
    was_training = model.training
    model.eval()
    x = torch.zeros(2, *input_size)
    _, feats = model(x)
    model.train(was_training)
    return [tuple(f.shape[1:]) for f in feats["feats"]]
