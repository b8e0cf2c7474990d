"""The commands: the top layer. One module per command, each with ``main(argv)``.

=====================  ==================================  ====================================
command                console script                      module
=====================  ==================================  ====================================
train                  ``mdistiller-blockkd-train``        :mod:`.train`
eval                   ``mdistiller-blockkd-eval``         :mod:`.eval`
benchmark              ``mdistiller-blockkd-benchmark``    :mod:`.benchmark`
report                 ``mdistiller-blockkd-report``       :mod:`.report`
study                  ``mdistiller-blockkd-study``        :mod:`.study`
demo                   ``mdistiller-blockkd-demo``         :mod:`.demo`
make-fmnist-subset     (maintainers: the embedded subset)  :mod:`.make_fmnist_subset`
make-detection-set     (the small COCO-format set)         :mod:`.make_detection_set`
make-wordnet-set       (the WordNet text set)              :mod:`.make_wordnet_set`
stone-grads            (analysis: Block-KD's gradients)    :mod:`.stone_grads`
=====================  ==================================  ====================================

``python -m mdistiller_blockkd <command> [args]`` and ``mdistiller-blockkd <command> [args]``
run the same (:func:`main`); ``python -m mdistiller_blockkd configs`` lists the shipped
configs. In a checkout, ``python tools/<command>.py`` is a thin wrapper around the same
``main`` (mdistiller's habit). ``main(argv)`` raises
:class:`~mdistiller_blockkd.errors.UserError` for bad input; each module's ``cli(argv)``
(the console script) turns that into one ``error:`` line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

#: command name -> module of this package
COMMANDS = {
    "train": "train",
    "eval": "eval",
    "benchmark": "benchmark",
    "report": "report",
    "study": "study",
    "demo": "demo",
    "make-fmnist-subset": "make_fmnist_subset",
    "make-detection-set": "make_detection_set",
    "make-wordnet-set": "make_wordnet_set",
    "stone-grads": "stone_grads",
}

_USAGE = ("usage: python -m mdistiller_blockkd {" + ",".join(COMMANDS) + ",configs} [args ...]\n"
          "       (also: mdistiller-blockkd <command> ..., mdistiller-blockkd-<command> ...)")


def doc_parser(prog: str, doc: str, epilog_from: str) -> argparse.ArgumentParser:
    """A command's parser from its module docstring ``doc``: the first paragraph describes the command,
    the text from ``epilog_from`` on closes ``--help``, laid out as written."""
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog=doc[doc.index(epilog_from):],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def command_module(name: str):
    """The module of command ``name`` (``make_fmnist_subset`` and ``make-fmnist-subset`` alike)."""
    return importlib.import_module(f"{__name__}.{COMMANDS[name.replace('_', '-')]}")


def _list_configs(argv) -> int:
    from ..config import config_dir, list_configs

    if argv:
        print("usage: python -m mdistiller_blockkd configs", file=sys.stderr)
        return 2
    names = list_configs()
    try:
        print(f"{len(names)} shipped configs in {config_dir()} (give --cfg one of these short names, or a file):")
        for n in names:
            print(f"  {n}")
        sys.stdout.flush()
    except BrokenPipeError:  # `... configs | head`
        sys.stdout = None
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatch ``<command> [args]`` to that command's ``cli``; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE + "\n\nRun '<command> --help' for a command's options.")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "configs":
        return _list_configs(rest)
    if name.replace("_", "-") not in COMMANDS:
        print(f"error: unknown command '{name}'; use one of {', '.join(COMMANDS)}, configs", file=sys.stderr)
        return 2
    return command_module(name).cli(rest)
