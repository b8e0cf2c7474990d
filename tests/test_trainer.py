"""The trainer, checkpoints and distiller building (in-process, tiny synthetic runs on the CPU)."""

import json
import os
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mdistiller_blockkd.data import get_dataloaders, get_loaders
from mdistiller_blockkd.distillers import Vanilla
from mdistiller_blockkd.engine.build import build_distiller
from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.utils.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from mdistiller_blockkd.engine.task import ClassificationTask
from mdistiller_blockkd.engine.trainer import Trainer, experiment_name, learning_rate
from mdistiller_blockkd.utils.misc import get_rng_state, seed_everything, set_rng_state
from mdistiller_blockkd.errors import CheckpointError, ConfigError, TrainingError
from mdistiller_blockkd.models import build_model

TIMING_KEYS = {"epoch_time_s", "ms_per_step"}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(tmp_path, *opts):
    base = [
        "DATASET.TYPE", "synthetic", "DATASET.NUM_WORKERS", "0",
        "DATASET.SYNTHETIC.TRAIN_SIZE", "48", "DATASET.SYNTHETIC.TEST_SIZE", "24",
        "DATASET.SYNTHETIC.NUM_CLASSES", "6", "DATASET.TEST.BATCH_SIZE", "16",
        "DISTILLER.STUDENT", "resnet8", "SOLVER.BATCH_SIZE", "16", "SOLVER.EPOCHS", "2",
        "SOLVER.LR", "0.05", "SOLVER.LR_DECAY_STAGES", "[1]", "SOLVER.WEIGHT_DECAY", "0.0005",
        "LOG.PREFIX", str(tmp_path), "LOG.PROGRESS", "False", "LOG.TENSORBOARD_FREQ", "2",
        "LOG.SAVE_CHECKPOINT_FREQ", "1", "EXPERIMENT.PROJECT", "p", "EXPERIMENT.NAME", "run",
    ]
    return load_cfg(None, base + list(opts))


def make_trainer(cfg, distiller_fn=None):
    """What tools/train.py does, in-process: seed, data, distiller, trainer."""
    seed_everything(cfg.EXPERIMENT.SEED)
    loaders = get_loaders(cfg)
    num_classes = loaders.num_classes
    if distiller_fn is None:
        distiller = build_distiller(cfg, num_classes, "cpu")
    else:
        distiller = distiller_fn(build_model(cfg.DISTILLER.STUDENT, num_classes=num_classes), cfg)
    return Trainer(experiment_name(cfg), distiller, loaders.train, loaders.test, cfg, log=lambda *a: None,
                   holdout_loader=loaders.val)


def run_dir(cfg):
    return os.path.join(cfg.LOG.PREFIX, cfg.EXPERIMENT.PROJECT, cfg.EXPERIMENT.NAME)


def read_metrics(cfg):
    with open(os.path.join(run_dir(cfg), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class Killed(Exception):
    pass


class Noisy(Vanilla):
    """Vanilla training whose loss depends on torch, numpy and python RNG draws (so RNG restore matters)."""

    kill_at = None  # (epoch, step): raise Killed there, like a process killed mid-epoch

    def __init__(self, student, cfg):
        super().__init__(student, None, cfg)
        self.calls = {}

    def forward_train(self, image, target, **kw):
        epoch = kw["epoch"]
        self.calls[epoch] = self.calls.get(epoch, 0) + 1
        if self.kill_at == (epoch, self.calls[epoch]):
            raise Killed()
        noise = 0.5 * torch.randn_like(image) * float(np.random.uniform(0.5, 1.5)) * random.uniform(0.5, 1.5)
        logits, _ = self.student(image + noise)
        return logits, {"loss_ce": F.cross_entropy(logits, target)}


class KilledNoisy(Noisy):
    kill_at = (2, 2)


def test_learning_rate_matches_mdistiller_schedule(tmp_path):
    cfg = make_cfg(tmp_path, "SOLVER.LR_DECAY_STAGES", "[150, 180, 210]")
    assert learning_rate(1, cfg) == pytest.approx(0.05)
    assert learning_rate(150, cfg) == pytest.approx(0.05)  # decays *after* the stage epoch
    assert learning_rate(151, cfg) == pytest.approx(0.005)
    assert learning_rate(181, cfg) == pytest.approx(0.0005)
    assert learning_rate(240, cfg) == pytest.approx(0.00005)


def test_rng_state_roundtrip_is_weights_only(tmp_path):
    seed_everything(3)
    state = get_rng_state()
    save_checkpoint({"rng": [state]}, tmp_path / "rng")
    a = (random.random(), float(np.random.rand()), float(torch.rand(())), random.gauss(0, 1))
    set_rng_state(load_checkpoint(tmp_path / "rng")["rng"][0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(())), random.gauss(0, 1)) == a


def test_resume_gives_exactly_the_uninterrupted_weights(tmp_path):
    full_cfg = make_cfg(tmp_path / "full")
    full = make_trainer(full_cfg, Noisy)
    full.train()
    assert [r["epoch"] for r in read_metrics(full_cfg)] == [1, 2]

    cfg = make_cfg(tmp_path / "split")
    killed = make_trainer(cfg, KilledNoisy)
    with pytest.raises(Killed):
        killed.train()  # epoch 1 finished and saved; killed in the middle of epoch 2
    assert load_checkpoint(os.path.join(run_dir(cfg), "latest"))["epoch"] == 1
    resumed = make_trainer(cfg, Noisy)  # a fresh process: new seed, data and model
    resumed.train(resume=True)

    a, b = full.distiller.state_dict(), resumed.distiller.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert strip(read_metrics(cfg)) == strip(read_metrics(full_cfg))
    # the noise matters: another seed gives other weights (so the equality above is not vacuous)
    other = make_trainer(make_cfg(tmp_path / "other", "EXPERIMENT.SEED", "1"), Noisy)
    other.train()
    assert not torch.equal(other.distiller.student.fc.weight, full.distiller.student.fc.weight)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(CheckpointError, match=r"cannot resume: '.*latest' not found"):
        make_trainer(cfg).train(resume=True)


def test_outputs_metrics_format_and_student_files(tmp_path):
    cfg = make_cfg(tmp_path)
    trainer = make_trainer(cfg)
    summary = trainer.train()
    out = run_dir(cfg)
    names = set(os.listdir(out))
    assert {"latest", "best", "student_latest", "student_best", "epoch_1", "epoch_2", "student_1", "student_2",
            "ckpt_epoch_2.pth", "config.yaml", "metrics.jsonl", "worklog.txt", "train.events", ".lock"} == names
    rows = read_metrics(cfg)
    assert [r["epoch"] for r in rows] == [1, 2]
    expected = {"epoch", "lr", "train_loss", "loss_ce", "train_acc", "test_acc", "test_acc_top5", "test_loss",
                "best_acc", "epoch_time_s", "ms_per_step"}
    for r in rows:
        assert set(r) == expected
        assert all(isinstance(r[k], (int, float)) for k in expected)
        assert r["train_loss"] == pytest.approx(r["loss_ce"])
        assert 0 <= r["test_acc"] <= r["test_acc_top5"] <= 100
    assert rows[0]["lr"] == pytest.approx(0.05) and rows[1]["lr"] == pytest.approx(0.005)
    assert rows[1]["best_acc"] == max(r["test_acc"] for r in rows) == summary["best_acc"]
    assert load_cfg(os.path.join(out, "config.yaml")).dump() == cfg.dump()
    latest = load_checkpoint(os.path.join(out, "latest"))
    assert latest["epoch"] == 2 and set(latest) >= {"model", "optimizer", "best_acc", "rng", "scaler"}
    student_keys = set(trainer.distiller.student.state_dict())
    for name in ("student_latest", "student_best", "ckpt_epoch_2.pth"):
        ckpt = load_checkpoint(os.path.join(out, name))
        assert set(ckpt) == {"model"} and set(ckpt["model"]) == student_keys
    # the student file is a teacher checkpoint: it loads strictly and scores the logged accuracy
    model = build_model("resnet8", num_classes=6)
    load_model_weights(model, os.path.join(out, "student_latest"), name="resnet8")
    _, val_loader, _ = get_dataloaders(cfg)
    from mdistiller_blockkd.engine.trainer import evaluate_model

    acc = evaluate_model(Vanilla(model, None, cfg), val_loader, "cpu")["test_acc"]
    assert acc == pytest.approx(rows[-1]["test_acc"])
    worklog = open(os.path.join(out, "worklog.txt")).read()
    assert "epoch: 2" in worklog and "best_acc" in worklog


def test_distiller_with_teacher_and_connectors(tmp_path):
    """Block-KD: stone accuracies are logged; student files hold the student only, latest no teacher."""
    teacher = build_model("resnet8", num_classes=6)
    save_checkpoint({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    cfg = make_cfg(tmp_path, "DISTILLER.TYPE", "BLOCKKD", "DISTILLER.TEACHER", "resnet8",
                   "DISTILLER.TEACHER_CKPT", str(tmp_path / "teacher.pth"), "SOLVER.EPOCHS", "1")
    trainer = make_trainer(cfg)
    assert torch.equal(trainer.distiller.teacher.fc.weight, teacher.fc.weight)
    trainer.train()
    row = read_metrics(cfg)[0]
    stones = [k for k in row if k.startswith("acc_stone")]
    assert stones and "acc_teacher" in row and "loss_kd" in row
    assert row["teacher_folded"] is True  # the teacher ran BN-folded (Distiller.teacher_model)
    out = run_dir(cfg)
    student = load_checkpoint(os.path.join(out, "student_latest"))["model"]
    assert set(student) == set(trainer.distiller.student.state_dict())
    latest = load_checkpoint(os.path.join(out, "latest"))["model"]
    assert not any(k.startswith("teacher.") for k in latest)
    assert any(k.startswith("connectors.") for k in latest)
    assert {k[len("student."):] for k in latest if k.startswith("student.")} == set(student)
    # resume: the teacher comes back from its own checkpoint, the rest from 'latest'
    cfg2 = make_cfg(tmp_path, "DISTILLER.TYPE", "BLOCKKD", "DISTILLER.TEACHER", "resnet8",
                    "DISTILLER.TEACHER_CKPT", str(tmp_path / "teacher.pth"), "SOLVER.EPOCHS", "2")
    resumed = make_trainer(cfg2)
    resumed.resume()
    assert resumed.start_epoch == 2
    for k, v in trainer.distiller.state_dict().items():
        w = resumed.distiller.state_dict()[k]
        assert torch.equal(v, w) if torch.is_tensor(v) else v == w, k  # non-tensors: module extra state


@pytest.mark.parametrize("freq, scored", [("0", []), ("2", [2, 3]), ("1", [1, 2, 3])])
def test_eval_heads_freq_scores_stones_only_on_chosen_epochs(tmp_path, freq, scored):
    """LOG.EVAL_HEADS_FREQ N: heads every N epochs and at the last one; 0 never."""
    teacher = build_model("resnet8", num_classes=6)
    save_checkpoint({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    cfg = make_cfg(tmp_path, "DISTILLER.TYPE", "BLOCKKD", "DISTILLER.TEACHER", "resnet8",
                   "DISTILLER.TEACHER_CKPT", str(tmp_path / "teacher.pth"), "SOLVER.EPOCHS", "3",
                   "LOG.EVAL_HEADS_FREQ", freq)
    make_trainer(cfg).train()
    rows = read_metrics(cfg)
    assert [r["epoch"] for r in rows if "acc_teacher" in r and "acc_stone1" in r] == scored
    assert all("test_acc" in r for r in rows)


def test_eval_heads_freq_must_not_be_negative():
    with pytest.raises(ConfigError, match="LOG.EVAL_HEADS_FREQ is -1"):
        load_cfg(None, ["LOG.EVAL_HEADS_FREQ", "-1"])


class NaNAtStep3(Vanilla):
    def __init__(self, student, cfg):
        super().__init__(student, None, cfg)
        self.step = 0

    def forward_train(self, image, target, **kw):
        self.step += 1
        logits, _ = self.student(image)
        kd = torch.tensor(float("nan")) if self.step == 3 else logits.sum() * 0
        return logits, {"loss_ce": F.cross_entropy(logits, target), "loss_kd": kd}


def test_nan_loss_raises_training_error_naming_epoch_step_and_terms(tmp_path):
    cfg = make_cfg(tmp_path)
    trainer = make_trainer(cfg, NaNAtStep3)
    with pytest.raises(TrainingError) as e:
        trainer.train()
    msg = str(e.value)
    assert "epoch 1, step 3/3" in msg and "loss_kd=nan" in msg and "loss_ce=" in msg and "\n" not in msg
    assert not os.path.exists(os.path.join(run_dir(cfg), "latest"))


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    cfg = make_cfg(tmp_path, "SOLVER.AMP", "bf16", "SOLVER.CHANNELS_LAST", "True", "SOLVER.EPOCHS", "1")
    trainer = make_trainer(cfg)
    seen = []
    conv = trainer.distiller.student.conv1
    conv.register_forward_hook(lambda m, i, o: seen.append((o.dtype, i[0].is_contiguous(memory_format=torch.channels_last))))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.train()
    assert (torch.bfloat16, True) in seen
    row = read_metrics(cfg)[0]
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["test_loss"])
    assert trainer.distiller.student.conv1.weight.dtype == torch.float32  # master weights stay fp32


def test_fp16_uses_a_grad_scaler_whose_state_is_saved(tmp_path):
    cfg = make_cfg(tmp_path, "SOLVER.AMP", "fp16", "SOLVER.EPOCHS", "1")
    trainer = make_trainer(cfg)
    assert trainer.scaler.is_enabled()
    trainer.train()
    assert load_checkpoint(os.path.join(run_dir(cfg), "latest"))["scaler"]["scale"] > 0


# -- checkpoints --------------------------------------------------------------------------
def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))  # old file untouched
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary file left


def test_checkpoint_errors_are_clear(tmp_path):
    model = build_model("resnet20", num_classes=10)
    with pytest.raises(CheckpointError, match=r"checkpoint '.*missing\.pth' not found"):
        load_model_weights(model, tmp_path / "missing.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint '.*corrupt\.pth'.*corrupt"):
        load_model_weights(model, bad)
    foreign = tmp_path / "numpy_scalar.pth"
    torch.save({"model": {"w": torch.ones(1)}, "accuracy": np.float64(71.0)}, foreign)  # not loadable weights-only
    with pytest.raises(CheckpointError, match=r"numpy_scalar\.pth' holds Python objects .*numpy.*re-save"):
        load_checkpoint(foreign)
    other = tmp_path / "resnet8.pth"
    save_checkpoint({"model": build_model("resnet8", num_classes=10).state_dict()}, other)
    with pytest.raises(CheckpointError) as e:
        load_model_weights(model, other, name="resnet20")
    msg = str(e.value)
    assert "does not fit model 'resnet20'" in msg and "missing" in msg and "another architecture" in msg
    wrong_classes = tmp_path / "c100.pth"
    save_checkpoint({"model": build_model("resnet20", num_classes=100).state_dict()}, wrong_classes)
    with pytest.raises(CheckpointError, match=r"2 of another shape, e\.g\. fc\.weight \(100, 64\) vs \(10, 64\)"):
        load_model_weights(model, wrong_classes, name="resnet20")


def test_load_model_weights_accepts_bare_and_prefixed_state_dicts(tmp_path):
    src = build_model("resnet8", num_classes=10)
    bare = tmp_path / "bare.pth"
    save_checkpoint({f"module.{k}": v for k, v in src.state_dict().items()}, bare)
    dst = build_model("resnet8", num_classes=10)
    load_model_weights(dst, bare)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


def test_build_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"unknown DISTILLER.TYPE 'FOO'; valid types: .*BLOCKKD.*KD.*NONE"):
        build_distiller(make_cfg(tmp_path, "DISTILLER.TYPE", "FOO"), 6)
    cfg = make_cfg(tmp_path, "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet8")
    with pytest.raises(CheckpointError) as e:
        build_distiller(cfg, 6)
    msg = str(e.value)
    assert "download_ckpts/cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth" in msg and "DISTILLER.TEACHER_CKPT" in msg
    cfg = make_cfg(tmp_path, "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet8",
                   "DISTILLER.TEACHER_CKPT", str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match=r"nope\.pth' \(DISTILLER.TEACHER_CKPT\) not found"):
        build_distiller(cfg, 6)
    with pytest.raises(ConfigError, match="resnet9000"):
        build_distiller(make_cfg(tmp_path, "DISTILLER.STUDENT", "resnet9000"), 6)


def test_fresh_run_refuses_to_overwrite_a_foreign_teacher_file(tmp_path):
    cfg = make_cfg(tmp_path, "SOLVER.EPOCHS", "1")
    os.makedirs(run_dir(cfg))
    save_checkpoint({"model": {}}, os.path.join(run_dir(cfg), "ckpt_epoch_1.pth"))
    with pytest.raises(ConfigError, match=r"ckpt_epoch_1\.pth' already exists"):
        make_trainer(cfg).train()


# -- no lost runs --------------------------------------------------------------------
def test_fresh_start_refuses_a_folder_with_a_run_until_overwrite(tmp_path):
    cfg = make_cfg(tmp_path, "SOLVER.EPOCHS", "1", "LOG.SAVE_CHECKPOINT_FREQ", "1")
    make_trainer(cfg).train()
    folder = run_dir(cfg)
    before = {n: os.path.getmtime(os.path.join(folder, n)) for n in ("latest", "metrics.jsonl", "student_best")}
    with pytest.raises(ConfigError) as e:
        make_trainer(cfg).train()
    msg = str(e.value)
    assert "\n" not in msg and folder in msg and "--resume" in msg and "EXPERIMENT.NAME" in msg and "--overwrite" in msg
    assert before == {n: os.path.getmtime(os.path.join(folder, n)) for n in before}  # nothing touched
    assert [r["epoch"] for r in read_metrics(cfg)] == [1]
    # --overwrite: the old run's checkpoints go (an old epoch_<n> would otherwise mix with the new run)
    open(os.path.join(folder, "epoch_7"), "wb").close()
    make_trainer(cfg).train(overwrite=True)
    assert "epoch_7" not in os.listdir(folder)
    assert [r["epoch"] for r in read_metrics(cfg)] == [1]
    # a run killed before its first epoch ended left no result: a plain fresh start is fine there
    fresh = make_cfg(tmp_path, "EXPERIMENT.NAME", "killed_early", "SOLVER.EPOCHS", "1")
    os.makedirs(run_dir(fresh))
    for name in ("config.yaml", "metrics.jsonl", "worklog.txt"):
        open(os.path.join(run_dir(fresh), name), "w").close()
    make_trainer(fresh).train()


def test_a_second_process_on_the_same_run_folder_stops(tmp_path):
    import subprocess
    import sys
    import time

    from mdistiller_blockkd.utils.fileio import FolderLock

    cfg = make_cfg(tmp_path, "SOLVER.EPOCHS", "1")
    folder = run_dir(cfg)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mdistiller_blockkd.utils.fileio import FolderLock\n"
         f"FolderLock({folder!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"in use by another process \(pid {holder.pid}\)"):
            make_trainer(cfg).train()
        assert not os.path.isfile(os.path.join(folder, "latest"))
    finally:
        holder.kill()  # SIGKILL: the lock must not stay stuck
        holder.wait()
    time.sleep(0.1)
    with FolderLock(folder):
        pass
    make_trainer(cfg).train()
    assert [r["epoch"] for r in read_metrics(cfg)] == [1]
    # the lock is released at the end of a run (and after an error): this process takes it again
    with pytest.raises(ConfigError, match="already holds a run"):
        make_trainer(cfg).train()
    with FolderLock(folder):
        pass


def test_trainer_saves_the_augmentation_generator(tmp_path):
    cfg = make_cfg(tmp_path)
    trainer = make_trainer(cfg)
    assert set(trainer._generators()) == {"train_loader", "augment"}
    assert "gen_augment" in get_rng_state(generators=trainer._generators())


def test_validation_split_is_scored_and_chooses_the_best_epoch(tmp_path):
    cfg = make_cfg(tmp_path, "DATASET.SYNTHETIC.TRAIN_SIZE", "96", "DATASET.VAL_SPLIT", "48", "SOLVER.EPOCHS", "3")
    summary = make_trainer(cfg).train()
    rows = read_metrics(cfg)
    assert all({"val_acc", "val_acc_top5", "val_loss", "best_val_acc"} <= set(r) for r in rows)
    pick = max(range(3), key=lambda i: (rows[i]["val_acc"], i))  # ties: the later epoch, as the trainer
    assert rows[-1]["best_val_acc"] == rows[pick]["val_acc"]
    assert summary["best_acc"] == rows[-1]["best_acc"] == rows[pick]["test_acc"]  # test at the best *val* epoch
    best = load_checkpoint(os.path.join(run_dir(cfg), "best"))
    assert best["epoch"] == pick + 1 and best["best_val_acc"] == rows[pick]["val_acc"]
    # without a split, best follows the test set as in mdistiller
    cfg2 = make_cfg(tmp_path, "EXPERIMENT.NAME", "plain", "SOLVER.EPOCHS", "2")
    make_trainer(cfg2).train()
    rows2 = read_metrics(cfg2)
    assert "val_acc" not in rows2[0] and rows2[-1]["best_acc"] == max(r["test_acc"] for r in rows2)


class NegativeScores(ClassificationTask):
    """A task whose primary metric (like CoLA's Matthews correlation) is negative and is not accuracy."""

    score_key = "test_mcc"

    def __init__(self):
        self.val_scores = iter([-40.0, -10.0, -30.0])
        self.test_scores = iter([-5.0, -6.0, -7.0])

    def evaluate(self, trainer, epoch=None):
        return {**super().evaluate(trainer, epoch), "test_mcc": next(self.test_scores)}

    def validate(self, trainer, epoch=None):
        return {**super().validate(trainer, epoch), "val_acc": 100.0 + epoch, "val_mcc": next(self.val_scores)}


def test_the_tasks_primary_metric_picks_best_even_when_negative(tmp_path):
    """best follows the task's val_score_key (not val_acc), and a score below -1 still makes a best checkpoint."""
    cfg = make_cfg(tmp_path, "DATASET.SYNTHETIC.TRAIN_SIZE", "96", "DATASET.VAL_SPLIT", "48", "SOLVER.EPOCHS", "3")
    t = make_trainer(cfg)
    t.task = NegativeScores()
    summary = t.train()
    rows = read_metrics(cfg)
    assert [r["best_val_acc"] for r in rows] == [-40.0, -10.0, -10.0]
    assert summary["best_acc"] == rows[-1]["best_acc"] == -6.0  # the test score at the best validation epoch
    assert load_checkpoint(os.path.join(run_dir(cfg), "best"))["epoch"] == 2
    # without a split: the best test score, negative too
    cfg2 = make_cfg(tmp_path, "EXPERIMENT.NAME", "plain", "SOLVER.EPOCHS", "2")
    t2 = make_trainer(cfg2)
    t2.task = NegativeScores()
    t2.train()
    assert [r["best_acc"] for r in read_metrics(cfg2)] == [-5.0, -5.0]
    assert os.path.isfile(os.path.join(run_dir(cfg2), "student_best"))


# -- run state: records after checkpoints, completeness, temporaries, the folder lock ---------------
def test_an_epoch_record_is_written_after_every_checkpoint_of_the_epoch(tmp_path, monkeypatch):
    """A run stopped while saving its last epoch is not finished; its resume trains that epoch again."""
    from mdistiller_blockkd.engine import trainer as trainer_mod
    from mdistiller_blockkd.utils.runfolder import run_finished

    saved = trainer_mod.save_checkpoint
    for last_file in ("ckpt_epoch_2.pth", "latest"):
        cfg = make_cfg(tmp_path / last_file)

        def dying_save(obj, path, last_file=last_file):
            if os.path.basename(path) == last_file and obj.get("epoch", 2) == 2:
                raise Killed()  # the process dies while writing this file of epoch 2
            saved(obj, path)

        monkeypatch.setattr(trainer_mod, "save_checkpoint", dying_save)
        with pytest.raises(Killed):
            make_trainer(cfg).train()
        monkeypatch.setattr(trainer_mod, "save_checkpoint", saved)
        assert [r["epoch"] for r in read_metrics(cfg)] == [1], last_file  # no record of the epoch being saved
        assert not run_finished(run_dir(cfg), 2)
        make_trainer(cfg, Noisy).train(resume=True)
        assert [r["epoch"] for r in read_metrics(cfg)] == [1, 2]
        assert run_finished(run_dir(cfg), 2)


def test_resume_writes_the_record_of_an_epoch_stopped_after_its_checkpoints(tmp_path, monkeypatch):
    from mdistiller_blockkd.engine import trainer as trainer_mod
    from mdistiller_blockkd.utils.runfolder import run_finished

    cfg = make_cfg(tmp_path)
    write = trainer_mod.append_json_line

    def dying_write(path, record):
        if record["epoch"] == 2:
            raise Killed()  # killed between the checkpoints of epoch 2 and its record
        write(path, record)

    monkeypatch.setattr(trainer_mod, "append_json_line", dying_write)
    with pytest.raises(Killed):
        make_trainer(cfg, Noisy).train()
    monkeypatch.setattr(trainer_mod, "append_json_line", write)
    folder = run_dir(cfg)
    assert load_checkpoint(os.path.join(folder, "latest"))["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(cfg)] == [1] and not run_finished(folder, 2)
    stored = load_checkpoint(os.path.join(folder, "latest"))["record"]
    resumed = make_trainer(cfg, Noisy)
    summary = resumed.train(resume=True)
    assert resumed.distiller.calls == {}  # nothing trained again: the record came from 'latest'
    rows = read_metrics(cfg)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1] == stored and summary["last"] == stored
    assert run_finished(folder, 2)
    worklog = open(os.path.join(folder, "worklog.txt")).read()
    assert "resumed from" in worklog and "test_acc:" in worklog.split("resumed from", 1)[1]  # the epoch's block


def test_resume_names_records_it_cannot_restore_and_removes_stale_temporaries(tmp_path):
    cfg = make_cfg(tmp_path)
    make_trainer(cfg).train()
    folder = run_dir(cfg)
    rows = read_metrics(cfg)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:  # epoch 1's line lost, epoch 2's too
        f.write("")
    stale = os.path.join(folder, ".latest.ab12cd_3.tmp")  # left by a process killed with SIGKILL while saving
    open(stale, "wb").close()
    make_trainer(make_cfg(tmp_path, "SOLVER.EPOCHS", "3")).train(resume=True)
    assert not os.path.exists(stale)
    got = read_metrics(cfg)
    assert [r["epoch"] for r in got] == [2, 3] and got[0] == json.loads(json.dumps(rows[1]))
    worklog = open(os.path.join(folder, "worklog.txt")).read()
    assert "no record of epoch(s) 1" in worklog


def test_folder_lock_is_not_held_by_forked_children_of_a_killed_holder(tmp_path):
    """A POSIX record lock: a data-loader worker forked by the holder does not keep it after the holder dies."""
    import signal
    import subprocess
    import sys

    from mdistiller_blockkd.utils.fileio import FolderLock

    folder = str(tmp_path / "run")
    script = ("import multiprocessing as mp, time\n"
              "from mdistiller_blockkd.utils.fileio import FolderLock\n"
              f"FolderLock({folder!r}).acquire()\n"
              "child = mp.get_context('fork').Process(target=time.sleep, args=(120,))\n"
              "child.start()\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(120)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=root,
                              env=dict(os.environ, PYTHONPATH=root))
    child = None
    try:
        child = int(holder.stdout.readline())
        with pytest.raises(ConfigError, match=rf"in use by another process \(pid {holder.pid}\)"):
            FolderLock(folder).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the forked child still runs
        with FolderLock(folder):  # at once: the child does not hold the lock
            pass
    finally:
        holder.kill()
        holder.wait()
        if child is not None:
            os.kill(child, signal.SIGKILL)


def test_folder_lock_is_exclusive_within_one_process(tmp_path):
    from mdistiller_blockkd.utils.fileio import FolderLock

    with FolderLock(tmp_path):
        with pytest.raises(ConfigError, match="in use by another process .*this process"):
            FolderLock(tmp_path).acquire()
    with FolderLock(tmp_path):
        pass


@pytest.mark.parametrize("key", ["NAME", "PROJECT", "TAG"])
@pytest.mark.parametrize("value", ["../elsewhere", "a/../../b", "/tmp/abs", ".."])
def test_experiment_names_stay_inside_log_prefix(tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"EXPERIMENT\.{key} is '{re.escape(value)}'.*absolute path or contain '\.\.'"):
        make_cfg(tmp_path, f"EXPERIMENT.{key}", value)
    make_cfg(tmp_path, f"EXPERIMENT.{key}", "sub/dir..name")  # a sub-folder and dots inside a name are fine


def test_resume_needs_the_runs_config_to_compare_with(tmp_path):
    cfg = make_cfg(tmp_path, "SOLVER.EPOCHS", "1")
    make_trainer(cfg).train()
    path = os.path.join(run_dir(cfg), "config.yaml")
    with open(path, "w") as f:
        f.write("SOLVER: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cannot resume: the run's settings '.*config\.yaml' cannot be read .*restore"):
        make_trainer(cfg).train(resume=True)


def test_adamw_linear_schedule_and_clipping_are_what_the_trainer_runs(tmp_path):
    """SOLVER.TYPE AdamW, SCHEDULER linear and CLIP_GRAD_NORM are used, not just accepted: the optimizer is AdamW,
    the learning rate warms up from 0 over WARMUP_EPOCHS and decays to 0 at the last update, gradients are clipped;
    a run killed after epoch 1 and resumed ends with the uninterrupted run's weights."""
    opts = ["SOLVER.TYPE", "AdamW", "SOLVER.SCHEDULER", "linear", "SOLVER.WARMUP_EPOCHS", "1.0", "SOLVER.LR", "0.001",
            "SOLVER.CLIP_GRAD_NORM", "0.5"]
    cfg = make_cfg(tmp_path / "full", *opts)
    t = make_trainer(cfg)
    assert isinstance(t.optimizer, torch.optim.AdamW) and t.optim.scheduler is not None
    norms = []
    real = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = lambda params, max_norm, **kw: norms.append(max_norm) or real(params, max_norm, **kw)
    try:
        t.train()
    finally:
        torch.nn.utils.clip_grad_norm_ = real
    rows = read_metrics(cfg)
    steps = len(t.train_loader)
    assert norms == [0.5] * (2 * steps)
    assert rows[0]["lr"] == pytest.approx(0.0)  # the warm-up starts at 0
    assert rows[1]["lr"] == pytest.approx(0.001)  # one epoch of warm-up: the peak when epoch 2 starts
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed to 0 after the last update
    # the schedule resumes exactly: killed in epoch 2 and resumed, the run ends with the uninterrupted weights
    full = make_trainer(make_cfg(tmp_path / "noisy", *opts), Noisy)
    full.train()
    split_cfg = make_cfg(tmp_path / "split", *opts)
    with pytest.raises(Killed):
        make_trainer(split_cfg, KilledNoisy).train()
    resumed = make_trainer(split_cfg, Noisy)
    resumed.train(resume=True)
    for k, v in full.distiller.state_dict().items():
        assert torch.equal(v, resumed.distiller.state_dict()[k]), k
    # more epochs on resume would stretch the decay over them: that changes the result, so it is refused
    from mdistiller_blockkd.utils.runfolder import resume_changes

    (change,) = resume_changes(split_cfg, make_cfg(tmp_path / "split", *(opts + ["SOLVER.EPOCHS", "3"])), 2)
    assert change.key == "SOLVER.EPOCHS" and change.changes_result
    (step,) = resume_changes(make_cfg(tmp_path), make_cfg(tmp_path, "SOLVER.EPOCHS", "3"), 2)
    assert not step.changes_result
