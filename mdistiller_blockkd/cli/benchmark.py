"""Time full training steps of distillers side by side, in one process, on synthetic batches.

For every (teacher -> student pair, distiller, variant) entry the tool builds the
distiller with randomly initialised models (no checkpoint: timing only), the config's
optimiser over ``get_learnable_parameters()``, and one fixed random batch, labels in
``[0, --num-classes)``: ``--batch-size`` images of ``3 x --image-size x --image-size``
(default 32), or for a text pair ``--batch-size`` sequences of ``--seq-len`` tokens
(default 64) drawn from the teacher's vocabulary, full attention mask, packed as the text
loader packs real batches (no data folder is read). A *step* is what the trainer does:
``forward_train`` -> sum of the loss terms -> ``backward`` -> ``SGD.step`` ->
``zero_grad``.

Procedure
    0. Peak memory, each entry in isolation (``--memory isolated``, the default): on
       CPU a fresh process per entry builds it and runs ``--warmup`` steps (at least
       one), and reports the growth of its peak resident set size over its size after
       the build; on CUDA the allocator's ``max_memory_allocated`` above the memory
       allocated after the build, reset per entry (see
       :mod:`mdistiller_blockkd.bench.memory`). ``--memory off`` skips it.
       ``--budget-mib MIB`` measures every entry again at half the batch (a fresh
       process, also on CUDA) and reports ``max_batch_in_budget``, the largest batch
       whose peak fits MIB, linear in the batch between the two figures.
    1. Warm-up pass, one entry after the other: build the entry and run ``--warmup``
       steps (the first step also builds the BN-folded teacher copy).
    2. Timed pass: ``--steps`` rounds; each round runs ONE step of every entry in turn
       (round-robin, starting one entry later each round), so drift of the machine
       (clock boost, thermal throttling, other processes) hits every entry alike.
       CUDA steps are synchronised before and after. A Block-KD ``every:K`` entry's
       timed step is one whole cycle of K steps (one with stones, K-1 without),
       divided by K, so its median is the mean cost per step.

Reported per entry: its precision (``fp32``, ``bf16``, ``fp16``; `` CL`` for
channels-last), median ms/step, images/s (``batch / median``; sequences/s for text
pairs), peak memory (MiB) and
its ratio to KD's at the same precision (``mem_ratio_to_kd``),
``ratio_to_kd``, the median divided by the median of plain ``KD`` on the same pair at
the same precision and layout, and ``ratio_to_fp32``, the median divided by that of the
entry's own fp32 twin (``null`` where the reference entry was not run). Entries of
every precision are timed in the same interleaved rounds, so these ratios come from one
process.

Entries
    ``--cfg FILE ...``        one entry per YAML config (its pair, DISTILLER.TYPE and
                              Block-KD variant, e.g. ``BLOCKKD.STONES``); a detection
                              config (DATASET.TYPE coco) times its Faster R-CNN
                              distiller (random teacher) on random images with 1-3
                              random boxes each, labels in [1, --num-classes);
    ``--pairs T:S ...``       pairs, each run with every ``--distillers`` name
                              (default: every registered distiller, NONE KD LSKD DKD
                              REVIEWKD BLOCKKD and those of outside packages);
                              ``--distillers`` also applies to the pairs of
                              ``--cfg`` files, whose settings are then kept;
    text entries              a ``--pairs`` pair of two local Hugging Face encoders,
                              ``hf:<folder>[,options]`` (an hf: model with an image
                              model is an error; give ``BLOCKKD.CONNECTOR linear_ln``),
                              or a ``--cfg`` with DATASET.TYPE tsv or glue (its data
                              folder is not read); ``--seq-len`` is their length
                              (an error when no entry is text, as ``--image-size`` is
                              when every entry is text); ``--channels-last`` is an
                              error for them;
    ``--variants SPEC ...``   extra entries per pair: ``NODE.KEY=VALUE[,NODE.KEY=VALUE]``
                              with NODE a distiller, e.g. ``BLOCKKD.STONES=sample:1``
                              (reported with variant ``sample:1``), optionally with the
                              step settings ``SOLVER.AMP`` and ``SOLVER.CHANNELS_LAST``
                              (``BLOCKKD.STONES=last:2,SOLVER.AMP=bf16``); a spec of step
                              settings alone (``SOLVER.AMP=bf16``) adds a twin of every
                              other entry with those settings;
    ``--amp``, ``--channels-last``  ``SOLVER.AMP`` / ``SOLVER.CHANNELS_LAST`` of every entry
                              (default: each config's own);
    trailing ``KEY=VALUE``    config overrides applied to every entry.
    With neither ``--cfg`` nor ``--pairs``: ``--pairs resnet56:resnet20``.

``--cost-model`` also prints, for every Block-KD entry, the cost-model ratio to KD
(backward ~ 2x forward for trained layers, ~ 1x for frozen layers that only
pass input gradients):

    cost(KD)       = 3 F(S) + F(T)
    cost(BLOCKKD)  = 3 F(S) + F(T) + sum_i [2 F(T_{j(i)+1..n} + head) + 3 F(C_i)]

over the stones of the entry (``all``: every stone; ``last:K``: the K deepest;
``sample:K``: the expectation over K stones drawn uniformly, i.e. K/n of the sum).
F is measured twice on the entry's batch: forward FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products) and
median forward wall time of each piece (student, BN-folded teacher, each teacher tail
through the staged view, each connector). With ``--json`` the numbers are written under
an extra top-level key ``cost_model``.

Examples (from the repository root, no installation needed)::

    mdistiller-blockkd-benchmark --pairs resnet56:resnet20 resnet32x4:resnet8x4 \\
        --distillers NONE KD DKD REVIEWKD BLOCKKD --variants BLOCKKD.STONES=sample:1 \\
        --device cuda --amp bf16 --channels-last --json bench.json
    mdistiller-blockkd-benchmark --pairs resnet56:resnet20 --distillers KD BLOCKKD \\
        --variants SOLVER.AMP=bf16 BLOCKKD.STONES=last:2,SOLVER.AMP=bf16 --threads 1   # fp32 vs bf16
    mdistiller-blockkd-benchmark --cfg detection/fmnist_det/{kd,vanilla,dkd,blockkd} \\
        --batch-size 8 --image-size 96 --num-classes 11 --threads 1   # detection (DATASET.TYPE coco)
    mdistiller-blockkd-benchmark --cfg cifar100/blockkd/res56_res20 \\
        --distillers KD --cost-model --threads 4 --steps 20
    mdistiller-blockkd-benchmark --pairs \\
        hf:data/models/all-MiniLM-L6-v2:hf:data/models/all-MiniLM-L6-v2,layers=3,pick=every_other \\
        --distillers KD BLOCKKD --variants BLOCKKD.STONES=last:2 SOLVER.AMP=bf16 \\
        --batch-size 32 --seq-len 64 --threads 1 BLOCKKD.CONNECTOR linear_ln   # text (docs/nlp.md)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import torch

from . import doc_parser
from ..bench import check_options, run_benchmark
from ..errors import run_cli
from ..utils.fileio import atomic_write_text, check_output_path
from ..utils.overrides import split_overrides
from ..utils.precision import AMP_CHOICES


def build_parser() -> argparse.ArgumentParser:
    p = doc_parser("mdistiller-blockkd-benchmark", __doc__, "Procedure")
    p.add_argument("--cfg", nargs="+", metavar="FILE", help="YAML configs, one entry each")
    p.add_argument("--pairs", nargs="+", metavar="T:S",
                   help="teacher:student pairs, e.g. resnet56:resnet20, timm:vit_small_patch16_224:timm:vit_tiny_"
                        "patch16_224 or (text) hf:data/models/all-MiniLM-L6-v2:hf:data/models/all-MiniLM-L6-v2,layers=3")
    p.add_argument("--distillers", nargs="+", metavar="NAME",
                   help="distillers run on every pair (default with --pairs or no --cfg: every registered distiller, "
                        "outside packages' included)")
    p.add_argument("--variants", nargs="+", metavar="SPEC", default=[],
                   help="extra entries per pair, NODE.KEY=VALUE[,NODE.KEY=VALUE], e.g. BLOCKKD.STONES=sample:1")
    p.add_argument("--batch-size", type=int, default=64, help="images (text: sequences) per step (default 64)")
    p.add_argument("--num-classes", type=int, default=100, help="classes of the models and labels (default 100)")
    p.add_argument("--image-size", type=int, default=None, help="square input size of image entries (default 32)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence of text entries (hf: pairs, text configs; default 64)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per entry before timing (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per entry, interleaved round-robin (default 10)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--amp", choices=AMP_CHOICES, default=None,
                   help="SOLVER.AMP of every entry (default: each config's; fp16 adds a grad scaler; a --variants "
                        "entry with SOLVER.AMP=... keeps its own)")
    p.add_argument("--channels-last", action="store_true",
                   help="SOLVER.CHANNELS_LAST True for every entry: models and batch in channels_last memory format")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and batch (default 0)")
    p.add_argument("--cost-model", action="store_true", help="print the Block-KD cost-model ratio to KD (FLOPs and times)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N steps of every entry (torch.profiler) and print where a step's time goes: "
                        "student, teacher, stones, connectors, losses (forward and backward), optimizer")
    p.add_argument("--saved-tensors", action="store_true",
                   help="also print what autograd keeps for backward per part (student, connectors, stones, losses)")
    p.add_argument("--memory", choices=("isolated", "off"), default="isolated",
                   help="peak memory per entry: isolated (CPU: a fresh process per entry; CUDA: the allocator's peak, "
                        "reset per entry) or off")
    p.add_argument("--budget-mib", type=float, default=None, metavar="MIB",
                   help="also measure every entry at half the batch (a fresh process each) and give the largest batch "
                        "whose peak memory fits MIB (linear in the batch between the two figures)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides applied to every entry")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; returns the exit status (errors in the input raise ``UserError``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    check_options(args)
    check_output_path(args.json, "--json")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = split_overrides(args.opts)
    if args.amp is not None:
        overrides += ["SOLVER.AMP", args.amp]
    if args.channels_last:
        overrides += ["SOLVER.CHANNELS_LAST", "True"]
    doc = run_benchmark(args, overrides, echo=lambda m: print(m, flush=True),
                        command=["mdistiller-blockkd-benchmark"] + argv)
    if args.json:
        atomic_write_text(args.json, json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cli(argv=None) -> int:
    """Console-script entry point: :func:`main` with one ``error:`` line for a user error."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
