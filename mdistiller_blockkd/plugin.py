"""Block-KD inside upstream mdistiller (its ``tools/train.py``, models, YAMLs and trainer).

:func:`register` adds this toolbox's Block-KD to an installed mdistiller:

* ``mdistiller.distillers.distiller_dict["BLOCKKD"]`` = :class:`MdistillerBlockKD`;
* ``mdistiller.engine.cfg.CFG.BLOCKKD`` = a clone of this toolbox's ``CFG.BLOCKKD`` node
  (only when mdistiller has none), so YAMLs with a ``BLOCKKD:`` section load.

mdistiller builds its own models, which have no staged view. :class:`MdistillerBlockKD`
adapts each one with :func:`as_staged`: the model's state-dict keys and shapes are
matched against this toolbox's registry (the CIFAR zoo, whose keys are mdistiller's,
and the torchvision-layout ImageNet ResNets 18/34/50/101/152 as ``timm:resnetXX``),
``num_classes`` is read from the classifier weight, the matching model is built, the
weights are copied with ``strict=True`` and one eval-mode forward checks that both
compute the same logits. The staged copy then serves as student / teacher, so
``distiller.student.state_dict()`` (what mdistiller saves as ``student_*``) keeps the
upstream keys. Models that already are :class:`StagedModel` s are used as they are.

Use either ``python -m mdistiller_blockkd.plugin <mdistiller>/tools/train.py --cfg X.yaml
[KEY VALUE ...]`` (registers, then runs that script as ``__main__``) or call
``mdistiller_blockkd.plugin.register()`` before the config is merged in your own script.
"""

from __future__ import annotations

import copy
import os
import runpy
import sys
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .models import build_model, list_models, model_dict
from .models.staged import StagedModel

__all__ = ["register", "as_staged", "match_architecture", "with_our_defaults", "MdistillerBlockKD", "MISSING_MESSAGE", "main"]

MISSING_MESSAGE = (
    "mdistiller is not importable; install it from its repository, or use this toolbox's own tools/train.py"
)

#: torchvision-layout ResNets (mdistiller's ImageNet ResNet18/34/50/101/152 share these keys).
IMAGENET_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class _Signature:
    """State-dict layout of one registry model (built on the meta device: no memory, no init cost)."""

    def __init__(self, name: str, shapes: Dict[str, torch.Size], classifier: str, probe: Tuple[int, ...]):
        self.name, self.shapes, self.classifier, self.probe = name, shapes, classifier, probe

    def num_classes(self, sd: Dict[str, Tensor]) -> Optional[int]:
        """``num_classes`` if ``sd`` has this layout (any classifier width), else None."""
        if set(sd) != set(self.shapes):
            return None
        w = sd.get(self.classifier + ".weight")
        if w is None or w.dim() != 2:
            return None
        n = int(w.shape[0])
        for k, shape in self.shapes.items():
            got = tuple(sd[k].shape)
            if k.startswith(self.classifier + "."):
                if got[1:] != tuple(shape)[1:] or (len(got) and got[0] != n):
                    return None
            elif got != tuple(shape):
                return None
        return n


_SIGNATURES: List[_Signature] = []


def _classifier_name(model: nn.Module) -> str:
    """Module path of the layer holding the classifier's 2-D weight.

    ``get_classifier()`` may be a container (mdistiller's MobileNetV2 uses
    ``nn.Sequential(nn.Linear)``, keys ``classifier.0.*``): its last submodule with a
    2-D ``weight`` is the one whose rows are the classes.
    """
    clf = model.get_classifier()
    for n, m in model.named_modules():
        if m is clf:
            linears = [(sub, mod) for sub, mod in clf.named_modules()
                       if isinstance(getattr(mod, "weight", None), Tensor) and mod.weight.dim() == 2]
            if not linears:
                raise RuntimeError(f"{type(model).__name__}.get_classifier() has no 2-D weight")  # pragma: no cover
            sub = linears[-1][0]
            return f"{n}.{sub}" if sub else n
    raise RuntimeError(f"{type(model).__name__}.get_classifier() is not one of its modules")  # pragma: no cover


def _signature(name: str, ctor, probe) -> _Signature:
    try:
        with torch.device("meta"):
            m = ctor()
    except Exception:  # a constructor that computes something: build it for real
        m = ctor()
    return _Signature(name, {k: v.shape for k, v in m.state_dict().items()}, _classifier_name(m), probe)


def _signatures() -> List[_Signature]:
    if not _SIGNATURES:
        list_models()  # imports every CIFAR family
        sigs = [_signature(n, lambda n=n: model_dict[n][0](num_classes=100), (2, 3, 32, 32)) for n in sorted(model_dict)]
        import timm

        sigs += [_signature(f"timm:{n}", lambda n=n: timm.create_model(n, num_classes=1000), (1, 3, 224, 224))
                 for n in IMAGENET_RESNETS]
        _SIGNATURES.extend(sigs)
    return _SIGNATURES


def match_architecture(state_dict: Dict[str, Tensor]) -> List[Tuple[str, int]]:
    """Registry names (``build_model`` names) whose state-dict layout is ``state_dict``'s,
    each with the ``num_classes`` read from the classifier weight."""
    out = []
    for sig in _signatures():
        n = sig.num_classes(state_dict)
        if n is not None:
            out.append((sig.name, n))
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _same_function(a: nn.Module, b: nn.Module, shape, device, dtype) -> Tuple[bool, str]:
    """Do ``a`` and ``b`` give the same logits (eval mode) on one random batch?"""
    modes = {m: m.training for m in list(a.modules()) + list(b.modules())}
    a.eval()
    b.eval()
    try:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        try:
            ya = _first(a(x))
        except Exception as e:
            return True, f"not checked: the model's forward failed on a {tuple(shape)} input ({type(e).__name__}: {e})"
        yb = _first(b(x))
        if not isinstance(ya, Tensor) or ya.shape != yb.shape:
            return False, f"its output is {getattr(ya, 'shape', type(ya).__name__)}, expected logits of shape {tuple(yb.shape)}"
        tol = 1e-4 * max(1.0, float(yb.abs().max()))
        if not torch.allclose(ya.float(), yb.float(), rtol=1e-3, atol=tol):
            return False, f"its logits differ by up to {float((ya - yb).abs().max()):.3g}"
        return True, ""
    finally:
        for m, mode in modes.items():
            m.training = mode


def as_staged(model: nn.Module, role: str = "model", verify: bool = True) -> StagedModel:
    """Return ``model`` as a :class:`StagedModel` with the same weights and state-dict keys.

    A :class:`StagedModel` (or a DataParallel / DDP wrapper of one) is returned as it
    is. Any other module is matched by state-dict layout against the registry (see
    :func:`match_architecture`); the matching model is built with the classifier's
    ``num_classes`` on the same device and dtype, loads the weights (``strict=True``),
    takes over ``requires_grad`` flags and the training mode, and (``verify``) must give
    the same logits on a random batch in eval mode.

    Raises :class:`ConfigError` when nothing matches or the matches compute another function.
    """
    inner = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
    if isinstance(inner, StagedModel):
        return inner
    if not isinstance(inner, nn.Module):
        raise ConfigError(f"the {role} is a {type(inner).__name__}, not a torch nn.Module")
    sd = inner.state_dict()
    label = f"the {role} ({type(inner).__name__}, {len(sd)} state-dict entries)"
    matches = match_architecture(sd)
    if not matches:
        raise ConfigError(
            f"{label} matches no model of mdistiller_blockkd by state-dict keys and shapes. BLOCKKD inside "
            "mdistiller supports its CIFAR models (" + ", ".join(sorted(model_dict)) + ") and its ImageNet "
            "ResNet18/34/50/101/152; other models (e.g. its ImageNet MobileNetV1) need this toolbox's own "
            "tools/train.py with a timm model (DISTILLER.STUDENT timm:mobilenetv1_100)"
        )
    first = next((t for t in sd.values() if t.is_floating_point()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    rejected = []
    for name, num_classes in matches:
        ours = build_model(name, num_classes=num_classes).to(device=device, dtype=dtype)
        ours.load_state_dict(sd, strict=True)
        flags = dict(inner.named_parameters())
        for n, p in ours.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n].requires_grad)
        ours.train(inner.training)
        if verify:
            sig = next(s for s in _signatures() if s.name == name)
            ok, why = _same_function(inner, ours, sig.probe, device, dtype)
            if not ok:
                rejected.append(f"{name} ({why})")
                continue
            if why:
                import warnings

                warnings.warn(f"{label} was identified as {name} by its state-dict layout only; {why}", stacklevel=2)
        return ours
    raise ConfigError(
        f"{label} has the state-dict layout of {', '.join(n for n, _ in matches)} but computes a different "
        f"function: {'; '.join(rejected)}. Use a model from mdistiller_blockkd's registry instead"
    )


def with_our_defaults(cfg):
    """This toolbox's full config with every key of ``cfg`` (mdistiller's) that it also has.

    mdistiller's ``CFG`` lacks this toolbox's added keys (``DISTILLER.FOLD_TEACHER_BN``...);
    the distiller reads them from the result, where they keep their defaults unless
    ``cfg`` sets them. Keys only mdistiller knows are left out.
    """
    from yacs.config import CfgNode

    from .config import CFG

    out = CFG.clone()
    if cfg is None:
        return out

    def overlay(dst, src):
        for k, v in src.items():
            if k not in dst:
                continue
            if isinstance(dst[k], CfgNode) and isinstance(v, CfgNode):
                overlay(dst[k], v)
            elif not isinstance(dst[k], CfgNode) and not isinstance(v, CfgNode):
                dst[k] = copy.deepcopy(v)

    overlay(out, cfg)
    out.freeze()
    return out


_CLASS = None


def _distiller_class():
    """Build (once) :class:`MdistillerBlockKD` on top of this toolbox's registered ``BLOCKKD``."""
    global _CLASS, MdistillerBlockKD
    if _CLASS is None:
        from .distillers import distiller_dict

        base = distiller_dict.get("BLOCKKD")
        if base is None:
            raise ImportError("mdistiller_blockkd's BLOCKKD distiller is not available (distillers/blockkd.py)")

        def __init__(self, student, teacher, cfg):
            if teacher is None:
                raise ConfigError("BLOCKKD needs a teacher (DISTILLER.TEACHER)")
            base.__init__(self, as_staged(student, "student"), as_staged(teacher, "teacher"), with_our_defaults(cfg))

        _CLASS = type("MdistillerBlockKD", (base,), {
            "__init__": __init__,
            "__module__": __name__,
            "__qualname__": "MdistillerBlockKD",
            "__doc__": "Block-KD for upstream mdistiller: its models are adapted with :func:`as_staged`, "
                       "then trained exactly as this toolbox's ``BLOCKKD``.",
        })
        MdistillerBlockKD = _CLASS
    return _CLASS


#: The class registered as ``BLOCKKD`` in mdistiller (set on first use of :func:`register`).
MdistillerBlockKD = None


def _import_upstream():
    try:
        import mdistiller  # noqa: F401
        import mdistiller.distillers as up_distillers
        import mdistiller.engine.cfg as up_cfg
    except ImportError as e:
        raise ImportError(f"{MISSING_MESSAGE} ({type(e).__name__}: {e})") from e
    return up_distillers, up_cfg


def register():
    """Register Block-KD in the importable upstream mdistiller; returns the distiller class.

    Adds ``BLOCKKD`` to ``mdistiller.distillers.distiller_dict`` and, if missing, the
    ``BLOCKKD`` config node (this toolbox's defaults) to ``mdistiller.engine.cfg.CFG``.
    Idempotent. Raises :class:`ImportError` when mdistiller is not importable.
    """
    up_distillers, up_cfg = _import_upstream()
    table = getattr(up_distillers, "distiller_dict", None)
    up_root = getattr(up_cfg, "CFG", None)
    if not isinstance(table, dict) or up_root is None:
        raise ImportError(
            "this mdistiller has no mdistiller.distillers.distiller_dict / mdistiller.engine.cfg.CFG; "
            f"it is not a supported version. {MISSING_MESSAGE}"
        )
    cls = _distiller_class()
    table["BLOCKKD"] = cls
    if "BLOCKKD" not in up_root:
        from .config import CFG

        frozen = up_root.is_frozen()
        if frozen:
            up_root.defrost()
        up_root.BLOCKKD = CFG.BLOCKKD.clone()
        if frozen:
            up_root.freeze()
    return cls


def main(argv=None) -> int:
    """``python -m mdistiller_blockkd.plugin <mdistiller>/tools/train.py [its arguments]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py") or not os.path.isfile(argv[0]):
        print("usage: python -m mdistiller_blockkd.plugin <path to mdistiller's tools/train.py> --cfg FILE "
              "[--resume] [KEY VALUE ...]", file=sys.stderr)
        return 2
    try:
        register()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    script = os.path.abspath(argv[0])
    sys.argv = [script] + argv[1:]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    from .errors import run_cli

    sys.exit(run_cli(main))
