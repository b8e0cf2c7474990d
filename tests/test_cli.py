"""tools/train.py and tools/eval.py as a user runs them (subprocesses, tiny synthetic runs on the CPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train.py")
EVAL = os.path.join(ROOT, "tools", "eval.py")
SMOKE = os.path.join(ROOT, "configs", "synthetic", "vanilla_resnet8.yaml")
TINY = ["DATASET.SYNTHETIC.TRAIN_SIZE", "64", "DATASET.SYNTHETIC.TEST_SIZE", "40", "SOLVER.BATCH_SIZE", "16",
        "DATASET.TEST.BATCH_SIZE", "16", "LOG.PROGRESS", "False"]
RUN_FILES = {".lock", "latest", "best", "student_latest", "student_best", "config.yaml", "metrics.jsonl", "worklog.txt",
             "train.events"}
METRIC_KEYS = {"epoch", "lr", "train_loss", "loss_ce", "train_acc", "test_acc", "test_acc_top5", "test_loss",
               "best_acc", "epoch_time_s", "ms_per_step"}


def env():
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"  # tiny models; the CPU is shared
    e["PYTHONPATH"] = ROOT  # this checkout's package (the tools/ wrappers import the installed one)
    return e


def start(args, cwd=ROOT):
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run(args, cwd=ROOT, timeout=120):
    return finish(start(args, cwd), timeout)


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_help():
    for script in (TRAIN, EVAL):
        rc, out, _ = run([script, "--help"])
        assert rc == 0 and "usage:" in out and "--cfg" in out


def test_two_epoch_synthetic_run_and_eval(tmp_path):
    rc, out, err = run([TRAIN, "--cfg", SMOKE, "LOG.PREFIX", str(tmp_path), *TINY])
    assert rc == 0, err
    assert "synthetic" in out and "epoch 2/2" in out
    folder = tmp_path / "synthetic" / "vanilla_resnet8"
    assert RUN_FILES | {"epoch_1", "epoch_2", "student_1", "student_2", "ckpt_epoch_2.pth"} == set(os.listdir(folder))
    rows = metrics(folder)
    assert [r["epoch"] for r in rows] == [1, 2] and all(set(r) == METRIC_KEYS for r in rows)
    # eval.py on the student file and on the training state reproduces the last logged accuracy
    for args in (["-m", "resnet8", "-c", str(folder / "student_latest"), "-d", "synthetic"],
                 ["--cfg", SMOKE, "--ckpt", str(folder / "latest")]):
        rc, out, err = run([EVAL, *args, *TINY])
        assert rc == 0, err
        assert f"top-1 {rows[-1]['test_acc']:.2f} top-5 {rows[-1]['test_acc_top5']:.2f}" in out


def test_bad_inputs_give_one_error_line(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("SOLVER:\n  EPOCHZ: 3\n")
    teacher_free = tmp_path / "elsewhere"
    teacher_free.mkdir()
    empty = tmp_path / "no_data"
    cases = {
        "unknown model": ([TRAIN, "--cfg", SMOKE, "DISTILLER.STUDENT", "resnet9000"], ROOT, "resnet9000"),
        "unknown distiller": ([TRAIN, "--cfg", SMOKE, "DISTILLER.TYPE", "FOOKD"], ROOT, "FOOKD"),
        "wrong YAML key": ([TRAIN, "--cfg", str(bad_yaml)], ROOT, "EPOCHZ"),
        "missing teacher": ([TRAIN, "--cfg", SMOKE, "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet8",
                             "LOG.PREFIX", str(tmp_path)], str(teacher_free),
                            "download_ckpts/cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth"),
        "missing dataset": ([TRAIN, "--cfg", SMOKE, "DATASET.TYPE", "cifar100", "DATASET.ROOT", str(empty),
                             "DATASET.DOWNLOAD", "False"], ROOT, str(empty)),
        "malformed Block-KD pairs": ([TRAIN, "--cfg", SMOKE, "DISTILLER.TYPE", "BLOCKKD", "DISTILLER.TEACHER",
                                      "resnet8", "BLOCKKD.PAIRS", "[1,2]"], str(teacher_free), "BLOCKKD.PAIRS entry 1"),
        "zero Block-KD temperature": ([TRAIN, "--cfg", SMOKE, "DISTILLER.TYPE", "BLOCKKD", "DISTILLER.TEACHER",
                                       "resnet8", "BLOCKKD.T", "0.0"], str(teacher_free), "BLOCKKD.T is 0.0"),
        "ReviewKD batch of one": ([TRAIN, "--cfg", SMOKE, "DISTILLER.TYPE", "REVIEWKD", "DISTILLER.TEACHER",
                                   "resnet8", "SOLVER.BATCH_SIZE", "1"], str(teacher_free), "SOLVER.BATCH_SIZE is 1"),
        "missing checkpoint (eval)": ([EVAL, "-m", "resnet8", "-c", str(tmp_path / "nope.pth"), "-d", "synthetic"],
                                      ROOT, "nope.pth"),
    }
    procs = {name: (start(args, cwd), needle) for name, (args, cwd, needle) in cases.items()}
    for name, (proc, needle) in procs.items():
        rc, out, err = finish(proc)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert rc != 0, name
        assert len(errors) == 1 and errors[0].startswith("error: "), (name, err)
        assert needle in errors[0], (name, errors[0])
        assert "Traceback" not in err, name
    assert not os.path.exists(teacher_free / "output")


def torchrun(tmp_path, *extra):
    return run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN,
                "--cfg", SMOKE, "LOG.PREFIX", str(tmp_path), *TINY, *extra], timeout=90)


@pytest.mark.slow
def test_two_process_gloo_run(tmp_path):
    """torchrun with 2 CPU processes: one checkpoint set, the usual metrics, exact whole-set evaluation, resume."""
    rc, out, err = torchrun(tmp_path, "SOLVER.EPOCHS", "1")
    assert rc == 0, err[-3000:]
    folder = tmp_path / "synthetic" / "vanilla_resnet8"
    assert RUN_FILES | {"epoch_1", "student_1", "ckpt_epoch_1.pth"} == set(os.listdir(folder))
    assert out.count("epoch 1/1") == 1  # only rank 0 prints
    (row,) = metrics(folder)
    assert set(row) == METRIC_KEYS
    ckpt = torch.load(folder / "latest", map_location="cpu", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # each rank has its own augmentation generator (distinct draws), saved for an exact resume
    assert not torch.equal(ckpt["rng"][0]["gen_augment"], ckpt["rng"][1]["gen_augment"])
    # the logged accuracy is over the whole test set (40 items split 20/20 over the ranks)
    from mdistiller_blockkd.data import get_dataloaders
    from mdistiller_blockkd.distillers import Vanilla
    from mdistiller_blockkd.config import load_cfg
    from mdistiller_blockkd.utils.checkpoint import load_model_weights
    from mdistiller_blockkd.engine.trainer import evaluate_model
    from mdistiller_blockkd.models import build_model

    cfg = load_cfg(SMOKE, TINY)
    _, val_loader, n = get_dataloaders(cfg)
    model = build_model("resnet8", num_classes=n)
    load_model_weights(model, folder / "student_latest")
    assert evaluate_model(Vanilla(model, None, cfg), val_loader, "cpu")["test_acc"] == pytest.approx(row["test_acc"])
    # resume under torchrun: one more epoch continues the same run
    rc, out, err = torchrun(tmp_path, "SOLVER.EPOCHS", "2", "--resume")
    assert rc == 0, err[-3000:]
    assert "resumed from" in out and out.count("epoch 2/2") == 1 and "epoch 1/2" not in out
    assert [r["epoch"] for r in metrics(folder)] == [1, 2]
    assert torch.load(folder / "latest", map_location="cpu", weights_only=True)["epoch"] == 2


# -- --resume and the run's config.yaml ----------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_resume_refuses_settings_that_change_the_result_unless_asked(tmp_path, capsys):
    """Through the train command (in-process): the keys that may change pass, the others need --resume-with-changes,
    and every change is recorded in the run folder."""
    import yaml

    from mdistiller_blockkd.cli import train

    folder = tmp_path / "synthetic" / "vanilla_resnet8"
    base = ["--cfg", SMOKE, "LOG.PREFIX", str(tmp_path), *TINY]

    def config():
        return yaml.safe_load((folder / "config.yaml").read_text())

    assert train.cli(base + ["SOLVER.EPOCHS", "1"]) == 0
    original = (folder / "config.yaml").read_text()
    capsys.readouterr()
    # result-changing keys (recipe, seed, distiller options) are refused, listed with old and new values
    with pytest.raises(SystemExit) as e:
        train.cli(base + ["--resume", "SOLVER.EPOCHS", "2", "SOLVER.LR", "0.1", "EXPERIMENT.SEED", "3",
                          "BLOCKKD.T", "2.0", "DATASET.NUM_WORKERS", "0", "LOG.TENSORBOARD_FREQ", "3"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code != 0 and len(lines) == 1 and lines[0].startswith("error: --resume"), err
    assert "SOLVER.LR: 0.05 -> 0.1" in err and "EXPERIMENT.SEED: 0 -> 3" in err and "BLOCKKD.T: 4.0 -> 2.0" in err
    assert "--resume-with-changes" in err and "EPOCHS" not in err and "TENSORBOARD_FREQ" not in err
    assert (folder / "config.yaml").read_text() == original and [r["epoch"] for r in metrics(folder)] == [1]
    # keys that do not change the result pass: logging, loader workers, evaluation batch, more epochs
    assert train.cli(base + ["--resume", "SOLVER.EPOCHS", "2", "LOG.TENSORBOARD_FREQ", "3", "DATASET.TEST.BATCH_SIZE",
                             "8", "EXPERIMENT.DETERMINISTIC", "True"]) == 0
    assert [r["epoch"] for r in metrics(folder)] == [1, 2] and config()["LOG"]["TENSORBOARD_FREQ"] == 3
    assert (folder / "config_to_epoch_1.yaml").read_text() == original  # the settings of epoch 1
    (first,) = [json.loads(line) for line in (folder / "changes.jsonl").read_text().splitlines()]
    assert first["from_epoch"] == 2
    assert {c["key"]: (c["old"], c["new"], c["changes_result"]) for c in first["changes"]} == {
        "SOLVER.EPOCHS": (1, 2, False), "LOG.TENSORBOARD_FREQ": (8, 3, False), "DATASET.TEST.BATCH_SIZE": (16, 8, False),
        "EXPERIMENT.DETERMINISTIC": (False, True, False)}
    # SOLVER.EPOCHS below the epochs done changes the result (the run would claim fewer epochs than it has)
    with pytest.raises(SystemExit):
        train.cli(base + ["--resume", "SOLVER.EPOCHS", "1", "LOG.TENSORBOARD_FREQ", "3", "DATASET.TEST.BATCH_SIZE", "8",
                          "EXPERIMENT.DETERMINISTIC", "True"])
    assert "SOLVER.EPOCHS: 2 -> 1" in capsys.readouterr().err
    # --resume-with-changes accepts them and records them
    assert train.cli(base + ["--resume-with-changes", "SOLVER.EPOCHS", "3", "SOLVER.LR", "0.1"]) == 0
    assert [r["epoch"] for r in metrics(folder)] == [1, 2, 3] and config()["SOLVER"]["LR"] == 0.1
    second = json.loads((folder / "changes.jsonl").read_text().splitlines()[1])
    changed = {c["key"]: (c["old"], c["new"], c["changes_result"]) for c in second["changes"]}
    assert second["from_epoch"] == 3 and changed["SOLVER.LR"] == (0.05, 0.1, True)
    assert changed["SOLVER.EPOCHS"] == (2, 3, False) and changed["LOG.TENSORBOARD_FREQ"] == (3, 8, False)
    assert yaml.safe_load((folder / "config_to_epoch_2.yaml").read_text())["SOLVER"]["LR"] == 0.05
    worklog = (folder / "worklog.txt").read_text()
    assert "settings changed from epoch 3: " in worklog and "SOLVER.LR: 0.05 -> 0.1" in worklog
    # a new run in the folder does not inherit the old run's record of changes
    assert train.cli(base + ["--overwrite", "SOLVER.EPOCHS", "1"]) == 0
    assert not (folder / "changes.jsonl").exists() and not list(folder.glob("config_to_epoch_*"))


def test_sigterm_while_saving_leaves_no_temporary_file(tmp_path):
    """A command stopped by SIGTERM in the middle of an atomic write removes its temporary file."""
    import signal

    script = ("import sys, time, torch\n"
              "from mdistiller_blockkd.errors import run_cli\n"
              "from mdistiller_blockkd.utils.checkpoint import save_checkpoint\n"
              "def slow_save(obj, f, *a, **k):\n"
              "    f.write(b'half a checkpoint'); f.flush(); print('saving', flush=True); time.sleep(60)\n"
              "torch.save = slow_save\n"
              "sys.exit(run_cli(lambda argv: save_checkpoint({'epoch': 1}, sys.argv[1])))\n")
    proc = start(["-c", script, str(tmp_path / "latest")])
    try:
        assert proc.stdout.readline().strip() == "saving"
        assert len(os.listdir(tmp_path)) == 1  # the temporary file
        proc.send_signal(signal.SIGTERM)
        rc, _, err = finish(proc, timeout=30)
    finally:
        proc.kill()
    assert rc == 128 + signal.SIGTERM and "terminated" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_records_what_it_chose_and_resume_compares_that(tmp_path, capsys, monkeypatch, native):
    """SOLVER.AMP auto: bf16 where the CPU computes it natively, fp32 elsewhere; the start line says so, config.yaml
    holds the chosen setting, and resuming where auto means something else is a recipe change (refused)."""
    import yaml

    from mdistiller_blockkd.cli import train
    from mdistiller_blockkd.utils import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    folder = tmp_path / "synthetic" / "vanilla_resnet8"
    base = ["--cfg", SMOKE, "LOG.PREFIX", str(tmp_path), *TINY, "SOLVER.AMP", "auto"]
    assert train.cli(base + ["SOLVER.EPOCHS", "1"]) == 0
    chosen = "bf16" if native else "off"
    out = capsys.readouterr().out
    assert f"precision {'bf16' if native else 'fp32'} (SOLVER.AMP auto)" in out, out
    assert yaml.safe_load((folder / "config.yaml").read_text())["SOLVER"]["AMP"] == chosen
    assert train.cli(base + ["--resume", "SOLVER.EPOCHS", "2"]) == 0  # the same machine: auto chooses the same
    monkeypatch.setattr(precision, "native_bf16", lambda device: not native)
    with pytest.raises(SystemExit):
        train.cli(base + ["--resume", "SOLVER.EPOCHS", "3"])
    other = "off" if native else "bf16"
    err = capsys.readouterr().err
    assert f'SOLVER.AMP: "{chosen}" -> "{other}"' in err, err
    assert [r["epoch"] for r in metrics(folder)] == [1, 2]
