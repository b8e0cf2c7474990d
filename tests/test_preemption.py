"""Preemption-safe training: a stop signal saves the exact position in the epoch (``latest_step``),
``LOG.SAVE_EVERY_STEPS`` saves it too, and ``--resume`` continues from that step bit for bit.

Each run is a separate process (a tiny synthetic set, 2 epochs of 3 steps); the signal is a real
``os.kill`` sent while the run is inside a chosen step (the distiller prints a marker there and waits
until the test has signalled it).
"""

import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.engine.trainer import check_fresh_start
from mdistiller_blockkd.errors import PREEMPTED_EXIT, STOP_SIGNALS, ConfigError, Terminated, stop_signals_deferred
from mdistiller_blockkd.utils.runfolder import STEP_CHECKPOINT, resumable, run_finished

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = {"epoch_time_s", "ms_per_step"}

#: A run as the train command does it, with a distiller whose loss draws from torch, numpy and python's
#: RNGs and a training set that adds noise where the data loads (in the loader workers when there are some),
#: so that every random stream matters. PAUSE_AT=<epoch>,<step>: print PAUSED in that step and wait for GO.
SCRIPT = r"""
import os, random, sys, time
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
import mdistiller_blockkd.data as data
from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.distillers import Vanilla
from mdistiller_blockkd.engine.trainer import Trainer, experiment_name
from mdistiller_blockkd.errors import run_cli
from mdistiller_blockkd.models import build_model
from mdistiller_blockkd.utils import dist as du
from mdistiller_blockkd.utils.misc import seed_everything


class Augmented(Dataset):
    def __init__(self, base):
        self.base, self.targets = base, base.targets

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, target = self.base[i]
        return image + 0.3 * torch.randn_like(image), target


build_splits = data.build_splits
data.build_splits = lambda cfg: (lambda t, v, s, n: (Augmented(t), v, s, n))(*build_splits(cfg))
PAUSE = tuple(int(v) for v in os.environ["PAUSE_AT"].split(",")) if os.environ.get("PAUSE_AT") else None


class Noisy(Vanilla):
    def __init__(self, student, cfg):
        super().__init__(student, None, cfg)
        self.calls = {}

    def forward_train(self, image, target, **kw):
        epoch = kw["epoch"]
        self.calls[epoch] = self.calls.get(epoch, 0) + 1
        if (epoch, self.calls[epoch]) == PAUSE and du.get_rank() == 0:
            print(f"PAUSED {os.getpid()}", flush=True)
            while not os.path.exists(os.environ["GO"]):
                time.sleep(0.01)
        noise = 0.5 * torch.randn_like(image) * float(np.random.uniform(0.5, 1.5)) * random.uniform(0.5, 1.5)
        logits, _ = self.student(image + noise)
        return logits, {"loss_ce": F.cross_entropy(logits, target)}


def main(args):
    cfg = load_cfg(None, args[1:])
    info = du.init_distributed()
    try:
        seed_everything(cfg.EXPERIMENT.SEED)
        loaders = data.get_loaders(cfg, info.rank, info.world_size)
        distiller = Noisy(build_model(cfg.DISTILLER.STUDENT, num_classes=loaders.num_classes), cfg)
        trainer = Trainer(experiment_name(cfg), distiller, loaders.train, loaders.test, cfg, dist_info=info)
        trainer.train(resume=args[0] == "resume")
        if info.is_main:
            torch.save(trainer.distiller.state_dict(), os.path.join(trainer.log_path, "final_weights.pt"))
    finally:
        du.cleanup()


sys.exit(run_cli(main, sys.argv[1:]))
"""


def opts(prefix, workers, *extra):
    return ["DATASET.TYPE", "synthetic", "DATASET.NUM_WORKERS", str(workers),
            "DATASET.SYNTHETIC.TRAIN_SIZE", "48", "DATASET.SYNTHETIC.TEST_SIZE", "24",
            "DATASET.SYNTHETIC.NUM_CLASSES", "6", "DATASET.TEST.BATCH_SIZE", "16",
            "DISTILLER.STUDENT", "resnet8", "SOLVER.BATCH_SIZE", "16", "SOLVER.EPOCHS", "2",
            "SOLVER.LR", "0.05", "SOLVER.LR_DECAY_STAGES", "[1]", "LOG.PREFIX", str(prefix), "LOG.PROGRESS", "False",
            "LOG.TENSORBOARD_FREQ", "2", "EXPERIMENT.PROJECT", "p", "EXPERIMENT.NAME", "run", *extra]


def start(mode, args, pause=None, go=None, processes=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    if pause:
        env.update(PAUSE_AT=f"{pause[0]},{pause[1]}", GO=str(go))
    if processes == 1:
        cmd = [sys.executable, "-c", SCRIPT, mode, *args]
    else:  # torchrun runs a file
        script = os.path.join(os.path.dirname(os.path.dirname(str(args[args.index("LOG.PREFIX") + 1]))), "run.py")
        with open(script, "w") as f:
            f.write(SCRIPT)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               script, mode, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(mode, args, processes=1):
    proc = start(mode, args, processes=processes)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def stop_in_step(args, pause, signum, go, processes=1):
    """Start a fresh run, send ``signum`` (to rank 0 only) while it is inside step ``pause`` = (epoch, step),
    let it go on; return its exit status, stdout and stderr."""
    proc = start("fresh", args, pause, go, processes)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("PAUSED "):
                break
        else:
            raise AssertionError("the run never reached the pause: " + "".join(seen) + proc.stderr.read())
        os.kill(int(line.split()[1]), signum)
        open(go, "w").close()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(seen) + out, err


def folder(prefix):
    return os.path.join(str(prefix), "p", "run")


def metrics(prefix):
    with open(os.path.join(folder(prefix), "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f if line.strip()]


def weights(prefix):
    return torch.load(os.path.join(folder(prefix), "final_weights.pt"), weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run's folder for a number of loader workers (computed once per module)."""
    done = {}

    def get(workers):
        if workers not in done:
            prefix = tmp_path_factory.mktemp(f"full{workers}")
            rc, out, err = run("fresh", opts(prefix, workers))
            assert rc == 0, out + err
            done[workers] = prefix
        return done[workers]

    return get


def assert_same_run(prefix, reference):
    a, b = weights(prefix), weights(reference)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert metrics(prefix) == metrics(reference)
    assert [r["epoch"] for r in metrics(prefix)] == [1, 2]


@pytest.mark.parametrize("workers, signum, pause", [(0, signal.SIGUSR1, (1, 3)), (2, signal.SIGTERM, (2, 2))])
def test_a_signalled_run_saves_its_step_and_resumes_exactly(tmp_path, uninterrupted, workers, signum, pause):
    args = opts(tmp_path, workers)
    rc, out, err = stop_in_step(args, pause, signum, tmp_path / "go")
    epoch, step = pause
    assert rc == PREEMPTED_EXIT and "preempted" in err and "Traceback" not in err, out + err
    assert f"preempted at epoch {epoch} step {step}/3 ({signal.Signals(signum).name})" in out
    assert "resume with --resume" in out
    run_dir = folder(tmp_path)
    assert not glob.glob(os.path.join(run_dir, ".*tmp")) and not glob.glob(os.path.join(run_dir, "*.tmp"))
    # the mid-epoch checkpoint: plain tensors and containers, the position, never a finished epoch
    ckpt = torch.load(os.path.join(run_dir, STEP_CHECKPOINT), weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["steps"], ckpt["world_size"]) == (epoch, step, 3, 1)
    assert [r["epoch"] for r in metrics(tmp_path)] == list(range(1, epoch))
    assert resumable(run_dir) and not run_finished(run_dir, 2)
    assert os.path.isfile(os.path.join(run_dir, "latest")) == (epoch > 1)
    with pytest.raises(ConfigError, match="already holds a run"):  # a fresh start does not replace it
        check_fresh_start(run_dir, 2)

    rc, out, err = run("resume", args)
    assert rc == 0, out + err
    assert f"epoch {epoch} at step {step}" in out
    assert not os.path.exists(os.path.join(run_dir, STEP_CHECKPOINT))  # superseded by the epoch's 'latest'
    assert run_finished(run_dir, 2)
    assert_same_run(tmp_path, uninterrupted(workers))


def test_save_every_steps_lets_a_killed_run_resume_from_the_last_saved_step(tmp_path, uninterrupted):
    args = opts(tmp_path, 2, "LOG.SAVE_EVERY_STEPS", "2")
    rc, out, err = stop_in_step(args, (2, 3), signal.SIGKILL, tmp_path / "go")  # after the save at step 2
    assert rc == -signal.SIGKILL
    run_dir = folder(tmp_path)
    ckpt = torch.load(os.path.join(run_dir, STEP_CHECKPOINT), weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (2, 2)
    assert not run_finished(run_dir, 2) and [r["epoch"] for r in metrics(tmp_path)] == [1]
    stale = open(os.path.join(run_dir, STEP_CHECKPOINT), "rb").read()

    rc, out, err = run("resume", args)
    assert rc == 0 and "epoch 2 at step 2" in out, out + err
    assert_same_run(tmp_path, uninterrupted(2))
    assert not os.path.exists(os.path.join(run_dir, STEP_CHECKPOINT))  # step 2 of the last epoch: none saved

    # a mid-epoch checkpoint older than 'latest' (left by a kill between 'latest' and its removal) is dropped
    with open(os.path.join(run_dir, STEP_CHECKPOINT), "wb") as f:
        f.write(stale)
    rc, out, err = run("resume", args)
    assert rc == 0 and "nothing to do" in out and "removing" in out, out + err
    assert not os.path.exists(os.path.join(run_dir, STEP_CHECKPOINT))


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_and_resume_exactly(tmp_path):
    """torchrun, 2 CPU processes (gloo); only rank 0 gets SIGUSR1: rank 1 learns it at the step's loss check,
    both save their position in one latest_step and the resumed pair ends as the uninterrupted pair."""
    (tmp_path / "full").mkdir()
    (tmp_path / "split").mkdir()
    more = ("DATASET.SYNTHETIC.TRAIN_SIZE", "96")  # 3 steps of 16 per process
    full, split = opts(tmp_path / "full" / "out", 0, *more), opts(tmp_path / "split" / "out", 0, *more)
    rc, out, err = run("fresh", full, processes=2)
    assert rc == 0, out + err[-3000:]
    rc, out, err = stop_in_step(split, (2, 2), signal.SIGUSR1, tmp_path / "go", processes=2)
    # the processes exit with 75 (torchrun may stop the second after the first ended: 143); torchrun reports
    # the failure of its workers with its own status (1)
    assert rc == 1 and "exitcode  : 75" in err, out + err[-3000:]
    assert "preempted at epoch 2 step 2/3 (SIGUSR1)" in out, out + err[-3000:]
    run_dir = folder(tmp_path / "split" / "out")
    ckpt = torch.load(os.path.join(run_dir, STEP_CHECKPOINT), weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["world_size"], len(ckpt["position"])) == (2, 2, 2, 2)
    assert [p["log"]["count"] for p in ckpt["position"]] == [32, 32]  # each rank's own sums: 2 steps of 16
    rc, out, err = run("resume", split, processes=2)
    assert rc == 0 and "epoch 2 at step 2" in out, out + err[-3000:]
    assert_same_run(tmp_path / "split" / "out", tmp_path / "full" / "out")


@pytest.mark.parametrize("value", ["-1", "1.5", "True"])
def test_save_every_steps_must_be_a_whole_number_of_at_least_zero(value):
    with pytest.raises(ConfigError, match="LOG.SAVE_EVERY_STEPS"):
        load_cfg(None, ["LOG.SAVE_EVERY_STEPS", value])


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_a_stop_signal_is_recorded_and_a_second_one_unwinds(signum):
    """SIGTERM, SIGUSR1 (sbatch --signal) and SIGUSR2 (submitit) ask the trainer to stop after its step;
    a second signal stops at once, as SIGTERM does in a command; the previous handlers come back."""
    before = signal.getsignal(signum)
    with pytest.raises(Terminated):
        with stop_signals_deferred() as stop:
            os.kill(os.getpid(), signum)
            assert stop.signum == signum
            os.kill(os.getpid(), signum)
    assert signal.getsignal(signum) is before


def test_study_resumes_a_run_that_holds_only_a_mid_epoch_checkpoint(tmp_path):
    """A run stopped in its first epoch has 'latest_step' and no 'latest': unfinished, continued with --resume."""
    from mdistiller_blockkd.cluster.local import Cell, run_cells

    out = tmp_path / "p" / "run"
    out.mkdir(parents=True)
    (out / STEP_CHECKPOINT).write_bytes(b"")
    cell = Cell("c.yaml", None, "run", str(out), str(tmp_path / "run.log"), 2, [])
    lines = []
    assert run_cells([cell], 1, 1, dry_run=True, echo=lines.append) == []
    assert not cell.finished() and lines[0].startswith("[resume]"), lines
