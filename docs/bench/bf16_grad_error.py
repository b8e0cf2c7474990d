#!/usr/bin/env python
"""How far each loss term's student gradient under bf16 autocast lies from fp32 (docs/results.md, "bf16 parity").

For each ``CONFIG[@STUDENT_CHECKPOINT]`` (no checkpoint: the student as initialised), on
``--batches`` training batches of the config's data: every loss term's gradient with respect
to the student's parameters in fp32 and under ``torch.autocast("cpu", torch.bfloat16)``, and
the relative error ``||g_bf16 - g_fp32|| / ||g_fp32||``, averaged over the batches. A term
that is unsafe in bf16 shows an error well above the others'.

    python docs/bench/bf16_grad_error.py configs/fmnist/study600/res56_res20/kd.yaml@<run>/student_best \\
        -- DISTILLER.TEACHER_CKPT <teacher>/student_best
"""

import argparse
import sys

import torch

from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.engine.build import assemble
from mdistiller_blockkd.utils.checkpoint import load_checkpoint


def grad_errors(cfg_path, ckpt, opts, batches, epoch):
    cfg = load_cfg(cfg_path, opts)
    loaders, distiller = assemble(cfg)
    if ckpt:
        state = load_checkpoint(ckpt)
        distiller.student.load_state_dict(state.get("model", state))
    distiller.train()
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    errors = {}
    for i, batch in zip(range(batches), loaders.train):
        image, target = batch[:2]
        grads = {}
        for bf16 in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                _, losses = distiller(image=image, target=target, epoch=epoch)
            for name, value in losses.items():
                g = torch.autograd.grad(value.float().mean(), params, retain_graph=True, allow_unused=True)
                grads[bf16, name] = torch.cat([x.flatten() for x in g if x is not None])
        for name in losses:
            ref = grads[False, name]
            errors.setdefault(name, []).append(((grads[True, name] - ref).norm() / ref.norm()).item())
    return {name: sum(v) / len(v) for name, v in errors.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="CONFIG[@STUDENT_CHECKPOINT]")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--epoch", type=int, default=6, help="the epoch the distillers are told (past their warm-ups)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, opts = p.parse_args(argv[:cut]), argv[cut + 1:]
    torch.manual_seed(0)
    for run in args.runs:
        path, _, ckpt = run.partition("@")
        errs = grad_errors(path, ckpt, opts, args.batches, args.epoch)
        print(f"{path} @ {ckpt or 'initial weights'}: " + ", ".join(f"{k} {v:.4f}" for k, v in errs.items()))


if __name__ == "__main__":
    main()
