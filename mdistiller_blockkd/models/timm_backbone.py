"""timm CNNs as staged models (``build_model("timm:<name>")``); ViTs in :mod:`.timm_vit`.

:func:`build_timm_model` turns any timm CNN that publishes ``feature_info`` into a
:class:`TimmStagedModel` (and a timm ``VisionTransformer`` -- ViT, DeiT -- into a
:class:`~.timm_vit.TimmViTStagedModel`). The staging is read from timm's own metadata, never from a
per-architecture table:

* the model's top-level children are walked in registration order, descending into an
  ``nn.Sequential`` only when a ``feature_info`` module lives inside it (``blocks.0``,
  ``features.denseblock1``...), which gives an ordered list of *steps*;
* the list is cut right after every ``feature_info`` module: the **stem** is every step up
  to and including the first ``feature_info`` module, so ``feats[0]`` is timm's first
  feature (resnet: ``act1`` at stride 2; mobilenetv1: ``blocks.0``; convnext: ``stages.0``),
  and **block** ``i`` is every step after feature module ``i`` up to feature module ``i+1``
  (resnet block 0 is ``maxpool`` + ``layer1``). The staged ``feature_info`` is therefore
  timm's ``feature_info`` itself (``num_chs``, ``reduction``, ``module``);
* the steps after the last feature module that belong to timm's ``forward_features``
  (efficientnet's ``conv_head``/``bn2``, ...) are found with one dummy forward and form,
  with timm's ``forward_head``, the staged **head**.

At construction one small eval-mode forward checks that the chain of steps reproduces
timm's ``forward_features`` and logits and that every feature has its announced channel
count; a model whose forward is not such a chain (vision transformers, models with
extra logic in ``forward_features``) is refused with a :class:`ConfigError`
(``VisionTransformer`` models go to :mod:`.timm_vit` instead).

timm has no pre-activation outputs: ``preact_feats`` are the ``feats``.

State-dict keys
    The wrapper shares the timm model's tables of top-level children, parameters and
    buffers (the same dicts, so a module replaced on either side is seen by both; the timm model itself is kept
    outside the module tree and only serves its ``forward_head``/``get_classifier``), so
    ``state_dict()`` keys, order and shapes are exactly the plain timm model's. A plain timm checkpoint loads with
    ``load_state_dict`` (``strict=True``) and the staged model's weights load into
    ``timm.create_model(name)``; :func:`load_timm_checkpoint` /
    :meth:`TimmStagedModel.load_timm_state_dict` read the usual file formats.
"""

from __future__ import annotations

import difflib
import os
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..utils.checkpoint import extract_state_dict, read_state_dict
from ..errors import CheckpointError, ConfigError
from .staged import StagedModel, outputs_close

__all__ = ["TimmWrapper", "TimmStagedModel", "build_timm_model", "load_timm_checkpoint"]


def _import_timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a dependency
        raise ConfigError(f"timm models need the 'timm' package ({e}); install it with 'pip install timm'") from None
    return timm


def _flatten_steps(module: nn.Module, targets: Sequence[str], prefix: str = "") -> List[str]:
    """Dotted names of the modules run in order, descending only towards ``targets``."""
    steps = []
    for name, child in module.named_children():
        full = prefix + name
        if full in targets or not any(t.startswith(full + ".") for t in targets):
            steps.append(full)
        elif isinstance(child, nn.Sequential):
            steps += _flatten_steps(child, targets, full + ".")
        else:
            inner = [t for t in targets if t.startswith(full + ".")]
            raise ConfigError(
                f"feature module(s) {inner} sit inside '{full}' ({type(child).__name__}), which is not an "
                "nn.Sequential; this timm model cannot be cut into stages"
            )
    return steps


class TimmWrapper(StagedModel):
    """What every timm wrapper shares: the timm model's own tables, its head, DataParallel and train mode.

    The wrapper shares the timm model's tables of children, parameters and buffers (the
    same dicts: a module replaced on either side is seen by both, and the state-dict keys
    are timm's); the timm model itself is kept outside the module tree and serves its
    ``forward_head`` / ``get_classifier``. Subclasses stage the forward.
    """

    def __init__(self, model: nn.Module, name: str = ""):
        super().__init__()
        object.__setattr__(self, "_timm", model)  # outside the module tree: no key prefix
        for table in ("_modules", "_parameters", "_buffers"):
            object.__setattr__(self, table, getattr(model, table))
        self.timm_name = name
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        self.num_classes = int(getattr(model, "num_classes", 0))

    @property
    def timm_model(self) -> nn.Module:
        """The plain timm model (same modules and weights; its ``forward`` returns logits only)."""
        return self._timm

    def get_classifier(self) -> nn.Module:
        return self._timm.get_classifier()

    def _replicate_for_data_parallel(self):
        """DataParallel replica whose timm model runs the replica's modules (not the original's).

        The replica gets new tables (filled with replicated children and parameters by
        ``torch.nn.parallel.replicate``); a shallow copy of the timm model shares those
        tables, so ``forward_head`` / ``get_classifier`` use the replica's weights on the
        replica's device.
        """
        replica = super()._replicate_for_data_parallel()
        timm_replica = self._timm._replicate_for_data_parallel()
        for table in ("_modules", "_parameters", "_buffers"):
            object.__setattr__(timm_replica, table, getattr(replica, table))
        object.__setattr__(replica, "_timm", timm_replica)
        return replica

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if self.__dict__.get("_is_replica") and name in self.__dict__:
            # replicate() sets a replica's parameters (a ViT's cls_token, pos_embed) as plain
            # attributes, outside the shared tables: the timm replica must run them too
            object.__setattr__(self._timm, name, value)

    def train(self, mode: bool = True):
        super().train(mode)
        self._timm.training = mode  # timm's forward_head reads the root flag (head dropout)
        return self

    def reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
        """timm's ``reset_classifier`` (new classifier with ``num_classes`` outputs)."""
        self._timm.reset_classifier(num_classes, *args, **kwargs)
        self.num_classes = int(getattr(self._timm, "num_classes", num_classes))

    def load_timm_state_dict(self, state, strict: bool = True):
        """Load a plain timm checkpoint: a state dict, a checkpoint dict or a file path (see :func:`read_state_dict`)."""
        if isinstance(state, (str, os.PathLike)):
            return load_timm_checkpoint(self, state, strict=strict)
        sd = extract_state_dict(state, "<state dict>")
        try:
            return self.load_state_dict(sd, strict=strict)
        except RuntimeError as e:
            raise CheckpointError(f"state dict does not fit timm model '{self.timm_name}': {e}") from None

    @torch.no_grad()
    def _check_head(self, label: str, h: Tensor, ref_logits: Tensor) -> None:
        """The staged head on the last block output ``h`` must give timm's logits, also through ``pre_logits``."""
        if not outputs_close(self.forward_head(h), ref_logits):
            raise ConfigError(
                f"timm model '{label}': the staged head does not reproduce the model's logits; it cannot be staged"
            )
        if not outputs_close(self.classifier_forward(self.forward_head(h, pre_logits=True)), ref_logits):
            raise ConfigError(
                f"timm model '{label}': get_classifier() applied to forward_head(pre_logits=True) does not give "
                "the logits; it cannot be staged"
            )


class TimmStagedModel(TimmWrapper):
    """A timm CNN seen as ``stem -> blocks -> head`` (see the module docstring).

    Args:
        model: a timm model with ``feature_info``, ``forward_features``,
            ``forward_head`` and ``get_classifier``.
        name: its timm name (informational: ``timm_name``).
        probe_size: side of the square dummy input used to check the staging; default
            ``2 x`` the deepest reduction (at least 32 and the model's ``min_input_size``),
            then the model's own input size if the small probe fails (inception_v3...).

    Attributes: ``timm_name``, ``timm_model`` (the plain timm model, sharing every
    module and weight), ``pretrained_cfg`` (timm's dict: mean, std, input size...),
    ``num_features``, ``num_classes``, ``steps`` (dotted module names of the stem, each
    block and the head extras).
    """

    def __init__(self, model: nn.Module, name: str = "", probe_size: Optional[int] = None):
        label = name or type(model).__name__
        info = getattr(model, "feature_info", None)
        if info is None or not hasattr(model, "forward_head") or not hasattr(model, "forward_features"):
            raise ConfigError(
                f"timm model '{label}' has no feature_info / forward_features / forward_head; only timm CNNs "
                "that publish feature_info can be staged"
            )
        info = [dict(num_chs=int(d["num_chs"]), reduction=int(d["reduction"]), module=str(d["module"]))
                for d in list(info)]
        if len(info) < 2:
            raise ConfigError(f"timm model '{label}' lists {len(info)} feature stage(s); at least 2 are needed")
        own = [n for n, _ in model.named_parameters(recurse=False)] + [n for n, _ in model.named_buffers(recurse=False)]
        if own:
            raise ConfigError(
                f"timm model '{label}' keeps tensors {own} on its root module (not a plain CNN); it cannot be staged"
            )
        super().__init__(model, name)
        self.num_features = int(getattr(model, "num_features", info[-1]["num_chs"]))
        self.feature_info = info
        self.num_blocks = len(info) - 1

        targets = [d["module"] for d in info]
        steps = _flatten_steps(model, targets)
        missing = [t for t in targets if t not in steps]
        if missing:
            raise ConfigError(f"timm model '{label}': feature modules {missing} are not reachable as a chain of children")
        cuts = [steps.index(t) for t in targets]
        if cuts != sorted(cuts) or len(set(cuts)) != len(cuts):
            raise ConfigError(f"timm model '{label}': feature modules {targets} are not in forward order")
        self._stem_steps = steps[: cuts[0] + 1]
        self._block_steps = [steps[a + 1: b + 1] for a, b in zip(cuts, cuts[1:])]
        self._rest = steps[cuts[-1] + 1:]
        self._tail_steps: List[str] = []
        self._probe(label, probe_size)

    # -- construction helpers --------------------------------------------------------
    @property
    def steps(self) -> Dict[str, List]:
        """Dotted module names run by the stem, by each block, and by the head before timm's ``forward_head``."""
        return {"stem": list(self._stem_steps), "blocks": [list(b) for b in self._block_steps],
                "head": list(self._tail_steps)}

    def _run(self, names: Sequence[str], h: Tensor) -> Tensor:
        for n in names:
            h = self.get_submodule(n)(h)
        return h

    @torch.no_grad()
    def _probe(self, label: str, size: Optional[int]) -> None:
        """Find the head extras and check the staging against timm's own forward (eval mode)."""
        max_red = max(d["reduction"] for d in self.feature_info)
        native = int((self.pretrained_cfg.get("input_size") or (3, 224, 224))[-1])
        if size is not None:
            sizes = [int(size)]
        elif self.pretrained_cfg.get("fixed_input_size"):
            sizes = [native]
        else:
            min_size = int((self.pretrained_cfg.get("min_input_size") or (3, 0, 0))[-1])
            small = max(2 * max_red, 32, min_size)
            sizes = [-(-small // max_red) * max_red, native]  # small first, the model's own size if that fails
        param = next(iter(self.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        modes = {m: m.training for m in self._timm.modules()}
        modes[self] = self.training
        self.eval()
        try:
            for attempt, size in enumerate(sizes):
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(2, 3, size, size, generator=gen).to(device=device, dtype=dtype)
                try:
                    ref_feat = self._timm.forward_features(x)
                    ref_logits = self._timm(x)
                    h = self._run(self._stem_steps, x)
                    feats = [h]
                    for names in self._block_steps:
                        h = self._run(names, h)
                        feats.append(h)
                    break
                except Exception as e:
                    if attempt + 1 == len(sizes):
                        raise ConfigError(
                            f"timm model '{label}' failed a {size}x{size} probe forward ({type(e).__name__}: {e}); "
                            "it cannot be staged"
                        ) from None
            for d, f in zip(self.feature_info, feats):
                if not isinstance(f, Tensor) or f.dim() != 4 or f.shape[1] != d["num_chs"]:
                    got = f"shape {tuple(f.shape)}" if isinstance(f, Tensor) else f"a {type(f).__name__}"
                    raise ConfigError(
                        f"timm model '{label}': feature '{d['module']}' is {got}, expected a tensor "
                        f"NCHW with {d['num_chs']} channels; only CNNs with NCHW stage outputs can be staged"
                    )
            tail, found = [], outputs_close(h, ref_feat)
            for n in self._rest:
                if found:
                    break
                try:
                    h = self.get_submodule(n)(h)
                except Exception:
                    break
                tail.append(n)
                found = outputs_close(h, ref_feat)
            if not found:
                raise ConfigError(
                    f"timm model '{label}': running its children in order does not reproduce forward_features; "
                    "its forward is not a plain chain of modules, so it cannot be staged"
                )
            self._tail_steps = tail
            self._check_head(label, feats[-1], ref_logits)
        finally:
            for m, mode in modes.items():
                m.training = mode

    # -- StagedModel protocol ------------------------------------------------------------
    def forward_stem(self, x: Tensor):
        h = self._run(self._stem_steps, x)
        return h, h

    def forward_block(self, i: int, h: Tensor):
        self.check_block_index(i)
        h = self._run(self._block_steps[i], h)
        return h, h

    def forward_head(self, h: Tensor, pre_logits: bool = False) -> Tensor:
        """Head extras (layers of timm's ``forward_features`` after the last stage), then timm's ``forward_head``."""
        return self._timm.forward_head(self._run(self._tail_steps, h), pre_logits=pre_logits)


# -- checkpoints ---------------------------------------------------------------------
def load_timm_checkpoint(model: nn.Module, path, strict: bool = True):
    """Load the weights file at ``path`` (any format of :func:`~mdistiller_blockkd.utils.checkpoint.read_state_dict`) into ``model``.

    Works for a :class:`TimmStagedModel` and for a plain timm model alike (same keys).
    Raises :class:`CheckpointError` naming missing / unexpected / mis-shaped keys.
    """
    sd = read_state_dict(path)
    try:
        return model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this model ({e}); check the architecture name and num_classes"
        ) from None


# -- builder ---------------------------------------------------------------------------
def build_timm_model(name: str, num_classes: int = 1000, pretrained=False, **kwargs) -> TimmStagedModel:
    """Build timm model ``name`` with ``num_classes`` outputs as a :class:`TimmStagedModel`
    (a ``VisionTransformer``: as a :class:`~.timm_vit.TimmViTStagedModel`).

    ``pretrained``: ``False``/``None``/``""`` random init; ``True`` timm's own weights
    (downloaded from the Hugging Face hub; with ``num_classes`` other than the weights'
    classes timm leaves the classifier random); a path loads a local checkpoint (see
    :func:`read_state_dict`) with ``strict=True``. Extra ``kwargs`` go to
    ``timm.create_model`` (``drop_rate``, ``drop_path_rate``, ``img_size``, ``patch_size``,
    ``depth``...), except ``blocks``: the number of blocks of a ViT (see :mod:`.timm_vit`).

    Raises :class:`ConfigError` for an unknown name, a bad argument or a model that
    cannot be staged; :class:`CheckpointError` when weights cannot be downloaded or loaded.
    """
    timm = _import_timm()
    if not isinstance(name, str) or not name or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for the names"
        raise ConfigError(f"unknown timm model '{name}'{hint}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    local = None
    if isinstance(pretrained, (str, os.PathLike)):
        local, pretrained = (os.fspath(pretrained) or None), False
    elif pretrained is None:
        pretrained = False
    elif not isinstance(pretrained, bool):
        raise ConfigError(f"pretrained must be True, False or a checkpoint path, got {pretrained!r}")
    blocks = kwargs.pop("blocks", None)
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ConfigError(f"timm model '{name}' rejected the arguments {sorted(kwargs)}: {e}") from None
    except Exception as e:
        if not pretrained:
            raise ConfigError(f"timm could not build '{name}': {type(e).__name__}: {e}") from None
        raise CheckpointError(
            f"could not download timm's pretrained weights for '{name}' ({type(e).__name__}: {e}). Check the "
            "network connection, or download the weights elsewhere and pass the local checkpoint path instead "
            "(DISTILLER.TEACHER_CKPT <file>, or pretrained='<file>')"
        ) from None
    if local is not None:
        load_timm_checkpoint(model, local)
    from .timm_vit import TimmViTStagedModel, is_vit

    if is_vit(model):
        return TimmViTStagedModel(model, name=name, blocks=0 if blocks is None else blocks)
    if blocks is not None:
        raise ConfigError(f"timm model '{name}': blocks={blocks} applies to ViTs only; a CNN's blocks are its "
                          "feature stages")
    return TimmStagedModel(model, name=name)
