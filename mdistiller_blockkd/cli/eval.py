"""Top-1 / top-5 accuracy of a checkpoint on a dataset's validation set (text: GLUE's metrics).

    mdistiller-blockkd-eval --cfg FILE --ckpt PATH [KEY VALUE ...]
    mdistiller-blockkd-eval -m resnet56 -c download_ckpts/cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth [-d cifar100]

(also ``python -m mdistiller_blockkd eval ...`` and, in a checkout, ``python tools/eval.py ...``.)

The model is ``-m`` or the config's ``DISTILLER.STUDENT``; the dataset is the config's
(``-d`` sets ``DATASET.TYPE``; trailing ``KEY VALUE`` pairs override anything, e.g.
``DATASET.ROOT embedded``). The checkpoint may be in the teacher format
(``{"model": state_dict}``: mdistiller's teachers, ``student_best``...), a bare state
dict, or a training state (``latest``, ``best``, ``epoch_<n>``: its student is used).
On text data (``DATASET.TYPE glue`` / ``tsv``) the ``hf:`` model's own tokenizer reads the
test set and the task's metrics are printed (accuracy; F1 for MRPC / QQP, Matthews for CoLA).
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError, run_cli


def parse_args(argv=None):
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="mdistiller-blockkd-eval", description="Evaluate a checkpoint: top-1 / top-5 on the validation set.")
    parser.add_argument("--cfg", metavar="FILE", help="YAML config giving the dataset and DISTILLER.STUDENT")
    parser.add_argument("--ckpt", "-c", required=True, metavar="PATH", help="checkpoint file")
    parser.add_argument("--model", "-m", metavar="NAME", help="model name (default: the config's DISTILLER.STUDENT)")
    parser.add_argument("--dataset", "-d", metavar="TYPE", help="DATASET.TYPE (cifar100, fashion_mnist, imagenet, synthetic)")
    parser.add_argument("--batch-size", "-bs", type=int, metavar="N", help="DATASET.TEST.BATCH_SIZE")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (an outside package that registers models)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    return parser.parse_args(argv)


def main(argv=None):
    """Evaluate and print the accuracies; return the metrics dict."""
    args = parse_args(argv)
    import torch
    from torch.utils.data import DataLoader

    from ..data import build_datasets, dataset_description
    from ..distillers import Vanilla
    from ..config import load_cfg
    from ..utils.checkpoint import check_checkpoint_file, load_model_weights
    from ..data.text import metric_names
    from ..engine.build import is_text, text_collator
    from ..utils.console import progress_settings
    from ..engine.trainer import evaluate_model
    from ..models import build_model
    from ..registry import import_modules

    import_modules(args.imports)
    opts = list(args.opts or [])
    if args.dataset:
        opts += ["DATASET.TYPE", args.dataset]
    if args.batch_size is not None:
        opts += ["DATASET.TEST.BATCH_SIZE", str(args.batch_size)]
    if not args.cfg and not args.model:
        raise ConfigError("name the model: give -m MODEL, or --cfg FILE whose DISTILLER.STUDENT is the model")
    cfg = load_cfg(args.cfg, opts)
    name = args.model or cfg.DISTILLER.STUDENT
    check_checkpoint_file(args.ckpt)  # before the data is read
    text = is_text(cfg)
    collate = text_collator(cfg, name) if text else None
    _, val_set, num_classes = build_datasets(cfg)
    model = build_model(name, num_classes=num_classes)
    load_model_weights(model, args.ckpt, name=name, prefix="student.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wrapper = Vanilla(model, None, cfg).to(device)
    loader = DataLoader(val_set, batch_size=int(cfg.DATASET.TEST.BATCH_SIZE), shuffle=False,
                        num_workers=int(cfg.DATASET.NUM_WORKERS), pin_memory=device.type == "cuda",
                        collate_fn=collate)
    names = metric_names(cfg) if text else ()
    metrics = evaluate_model(wrapper, loader, device, progress=progress_settings(cfg), metrics=names,
                             num_classes=num_classes)
    print(f"data: {dataset_description(cfg)}")
    if text:
        scores = " ".join(f"{m} {metrics[f'test_{m}']:.2f}" for m in names)
        print(f"{name} from {args.ckpt}: {scores} loss {metrics['test_loss']:.4f} ({len(val_set)} examples)")
    else:
        print(f"{name} from {args.ckpt}: top-1 {metrics['test_acc']:.2f} top-5 {metrics['test_acc_top5']:.2f} "
              f"loss {metrics['test_loss']:.4f} ({len(val_set)} images)")
    return metrics



def cli(argv=None) -> int:
    """Console-script entry point: :func:`main` with one ``error:`` line for a user error."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
