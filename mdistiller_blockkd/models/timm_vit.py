"""timm vision transformers (ViT, DeiT) as staged models (``build_model("timm:deit_tiny_patch16_224")``).

Any timm ``VisionTransformer`` (``vit_*``, ``deit_*`` without the distillation token...)
is staged as

* **stem** -- patch embedding, class (and register) tokens and position embedding,
  patch dropout and ``norm_pre``, as timm's ``forward_features`` runs them;
* **blocks** -- consecutive groups of transformer blocks: one block per transformer
  block by default, ``blocks=N`` groups them into N blocks of equal size (N must divide
  the depth);
* **head** -- the final ``norm``, then timm's ``forward_head`` (pooling, ``fc_norm``,
  head dropout, classifier).

Stage outputs are ``(B, N, C)`` token tensors; ``feature_info`` has ``num_chs`` = the
embedding width, ``reduction`` = the patch size and ``kind`` = ``"tokens"``.

Small images: timm's own keyword arguments size the model, e.g.
``timm:deit_tiny_patch16_224,img_size=32,patch_size=8,depth=4`` (see :mod:`.spec`) is a
DeiT-tiny with 16 patches of 8 px on 32 px images and 4 transformer blocks.

As for CNNs (:mod:`.timm_backbone`), the wrapper shares the timm model's tables, so the
state-dict keys are timm's, and one eval-mode forward at construction checks that the
stages reproduce timm's ``forward_features`` and logits. A model with a second head
(DeiT's distilled variants) or without a fixed token grid is refused or unchecked as
said below.

Token count: Block-KD feeds a student's tokens to the teacher's blocks, so the two must
share the token grid (patch size, image size, prefix tokens). Each block checks the
number of tokens it receives against its model's own (models built with
``dynamic_img_size`` have none and are not checked).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .staged import outputs_close
from .timm_backbone import TimmWrapper

__all__ = ["TimmViTStagedModel", "is_vit"]


def is_vit(model: nn.Module) -> bool:
    """True for a timm ``VisionTransformer`` (ViT, DeiT, their subclasses)."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


class TimmViTStagedModel(TimmWrapper):
    """A timm ``VisionTransformer`` seen as ``stem -> blocks -> head`` (see the module docstring).

    Args:
        model: the timm ``VisionTransformer``.
        name: its timm name (``timm_name``).
        blocks: number of blocks (0: one per transformer block); must divide the depth.

    Attributes: ``timm_name``, ``timm_model``, ``pretrained_cfg``, ``num_features``,
    ``num_classes``, ``num_tokens`` (tokens per image, prefix tokens included; ``None``
    with ``dynamic_img_size``).
    """

    def __init__(self, model: nn.Module, name: str = "", blocks: int = 0):
        label = name or type(model).__name__
        super().__init__(model, name)
        depth = len(model.blocks)
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise ConfigError(f"timm model '{label}': blocks={blocks!r}; use an integer >= 1 (or leave it out: one "
                              "block per transformer block)")
        blocks = blocks or depth
        if depth % blocks:
            raise ConfigError(f"timm model '{label}': blocks={blocks} does not divide its depth {depth}; use a "
                              f"divisor of {depth}")
        patch = tuple(int(p) for p in model.patch_embed.patch_size)
        if patch[0] != patch[1]:
            raise ConfigError(f"timm model '{label}' has non-square patches {patch}; only square patches are staged")
        per = depth // blocks
        self._groups: List[range] = [range(k * per, (k + 1) * per) for k in range(blocks)]
        self.num_blocks = blocks
        self.num_features = int(model.num_features)
        width = int(model.embed_dim)
        self.feature_info = [dict(num_chs=width, reduction=patch[0], module="patch_embed", kind="tokens")] + [
            dict(num_chs=width, reduction=patch[0], module=f"blocks.{g[-1]}", kind="tokens") for g in self._groups]
        self.num_tokens: Optional[int] = None if getattr(model, "dynamic_img_size", False) else (
            int(model.patch_embed.num_patches) + int(model.num_prefix_tokens))
        self._probe(label)

    @torch.no_grad()
    def _probe(self, label: str) -> None:
        """Check the stages against timm's ``forward_features`` and logits on one eval-mode batch."""
        img = tuple(int(s) for s in self.timm_model.patch_embed.img_size)
        param = next(iter(self.parameters()))
        modes = {m: m.training for m in self._timm.modules()}
        modes[self] = self.training
        self.eval()
        try:
            x = torch.randn(2, 3, *img, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
            try:
                ref_feat, ref_logits = self._timm.forward_features(x), self._timm(x)
                h = self.forward_stem(x)[0]
                for i in range(self.num_blocks):
                    h = self.forward_block(i, h)[0]
            except Exception as e:
                raise ConfigError(f"timm model '{label}' failed a probe forward ({type(e).__name__}: {e}); it cannot "
                                  "be staged") from None
            if not outputs_close(self._timm.norm(h), ref_feat):
                raise ConfigError(f"timm model '{label}': its patch embedding, blocks and norm run in order do not "
                                  "reproduce forward_features; it cannot be staged")
            try:
                self._check_head(label, h, ref_logits)
            except (TypeError, AttributeError) as e:  # a tuple of classifiers (distilled DeiT)
                raise ConfigError(f"timm model '{label}' has no single classifier ({type(e).__name__}: {e}); it "
                                  "cannot be staged (DeiT's distilled variants: use the plain deit_* name)") from None
        finally:
            for m, mode in modes.items():
                m.training = mode

    # -- StagedModel protocol ------------------------------------------------------------
    def forward_stem(self, x: Tensor):
        m = self._timm
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        return h, h

    def forward_block(self, i: int, h: Tensor):
        self.check_block_index(i)
        if self.num_tokens is not None and h.shape[1] != self.num_tokens:
            raise ConfigError(
                f"block {i + 1} of timm model '{self.timm_name}' got {h.shape[1]} tokens, it has {self.num_tokens} "
                "(patches + prefix tokens); Block-KD's student and teacher need the same token grid: the same "
                "img_size, patch_size and class/register tokens")
        blocks = self._timm.blocks
        for k in self._groups[i]:
            h = blocks[k](h)
        return h, h

    def forward_head(self, h: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's final ``norm``, then its ``forward_head`` (pooling, ``fc_norm``, head dropout, classifier)."""
        return self._timm.forward_head(self._timm.norm(h), pre_logits=pre_logits)
