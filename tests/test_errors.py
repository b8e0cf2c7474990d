"""Hostile input, as a new user gives it, gets one ``error:`` line and a non-zero exit: storage
errors while writing (a full disk, a read-only folder, a name too long), config files and
values, damaged run files, report inputs, checkpoints and command arguments."""

import errno
import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from mdistiller_blockkd.cli import benchmark, demo, eval as eval_cmd, report, study, train
from mdistiller_blockkd.config import list_configs, load_cfg
from mdistiller_blockkd.errors import CheckpointError, ConfigError, TrainingError, run_cli
from mdistiller_blockkd.utils import fileio, misc
from mdistiller_blockkd.utils.checkpoint import load_checkpoint, save_checkpoint
from mdistiller_blockkd.utils.fileio import read_json_lines

REPO = Path(__file__).resolve().parents[1]
TINY = ["DATASET.SYNTHETIC.TRAIN_SIZE", "32", "DATASET.SYNTHETIC.TEST_SIZE", "16", "SOLVER.BATCH_SIZE", "16",
        "DATASET.TEST.BATCH_SIZE", "16", "SOLVER.EPOCHS", "1", "LOG.PROGRESS", "False"]

pytestmark = pytest.mark.usefixtures("one_thread")


def one_error(capsys, call, code=2):
    """Run ``call`` (a command's ``cli``); return its single ``error:`` line, checking the exit status."""
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert e.value.code == code and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def train_args(prefix, *opts):
    return ["--cfg", "synthetic/vanilla_resnet8", "LOG.PREFIX", str(prefix), *TINY, *opts]


# -- storage errors ---------------------------------------------------------------------
@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
                                        (errno.EACCES, "Permission denied"), (errno.ENAMETOOLONG, "File name too long"),
                                        (errno.ENOTDIR, "Not a directory")])
def test_storage_errors_are_one_line_naming_path_and_errno(capsys, code, words):
    def main(argv):
        raise OSError(code, os.strerror(code), "/runs/x/latest")

    line = one_error(capsys, lambda: run_cli(main))
    assert "'/runs/x/latest'" in line and words in line and errno.errorcode[code] in line


def test_other_errors_keep_their_traceback():
    for exc in (OSError(errno.ENOENT, "No such file or directory", "/x"), OSError("no errno"), KeyError("bug")):
        def main(argv, exc=exc):
            raise exc

        with pytest.raises(type(exc)):
            run_cli(main)


def test_out_of_memory_is_one_line(capsys):
    def main(argv):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 1228799999999987712 bytes")

    assert "lower the batch size" in one_error(capsys, lambda: run_cli(main))


class _FullDisk:
    """A file whose writes fail as on a full disk (``OSError`` ENOSPC naming no file)."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_while_saving_a_checkpoint_names_it(tmp_path, monkeypatch):
    """torch.save turns the file's OSError into 'unexpected pos'; the save names the file and the errno."""
    path = tmp_path / "latest"
    real = os.fdopen
    monkeypatch.setattr(fileio.os, "fdopen", lambda *a, **k: _FullDisk(real(*a, **k)))
    with pytest.raises(OSError) as e:
        save_checkpoint({"model": {"w": torch.zeros(1000)}}, path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert os.listdir(tmp_path) == []  # no temporary file left


def test_full_disk_while_appending_a_record_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(misc.os, "write", full)
    with pytest.raises(OSError) as e:
        misc.append_json_line(str(path), {"epoch": 1})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)


def test_train_with_a_name_too_long_is_one_line(tmp_path, capsys):
    line = one_error(capsys, lambda: train.cli(train_args(tmp_path, "EXPERIMENT.NAME", "n" * 300)))
    assert "File name too long (ENAMETOOLONG)" in line and "n" * 300 in line


def test_train_in_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    prefix = tmp_path / "ro"
    real = os.makedirs

    def read_only(path, *a, **k):  # the tests run as root: chmod would not stop them
        if str(path).startswith(str(prefix)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "makedirs", read_only)
    line = one_error(capsys, lambda: train.cli(train_args(prefix)))
    assert str(prefix) in line and "Read-only file system (EROFS)" in line


def test_train_with_a_full_disk_under_the_event_file_is_one_line(tmp_path):
    """The event writer's flush fails: one error line naming train.events, and tensorboardX does not
    print more at exit (its thread is stopped, its exit hook finds it closed)."""
    code = ("import errno, os, sys\n"
            "import tensorboardX.record_writer as rw\n"
            "def full(self): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "rw.RecordWriter.flush = full\n"
            "from mdistiller_blockkd.cli import train\n"
            "sys.exit(train.cli(sys.argv[1:]))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code, *train_args(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: '{tmp_path / 'synthetic' / 'vanilla_resnet8' / 'train.events'}': No space left on device (ENOSPC); "
        "free some space, or write somewhere else"]


def test_output_paths_of_the_wrong_kind_are_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = one_error(capsys, lambda: train.cli(train_args(a_file / "under")))
    assert "is a file, not a folder" in line and str(a_file) in line
    bench = ["--pairs", "resnet20:resnet8", "--distillers", "NONE", "--steps", "1", "--warmup", "0", "--batch-size", "2"]
    assert "is a folder" in one_error(capsys, lambda: benchmark.cli(bench + ["--json", str(tmp_path)]))
    assert "is a file, not a folder" in one_error(capsys, lambda: benchmark.cli(bench + ["--json", str(a_file / "b.json")]))
    assert "'foo' is not a device" in one_error(capsys, lambda: benchmark.cli(bench + ["--device", "foo"]))
    assert "--seed" in one_error(capsys, lambda: benchmark.cli(bench + ["--seed", str(2 ** 70)]))
    assert "is a file, not a folder" in one_error(capsys, lambda: demo.cli(["--quick", "--out", str(a_file)]))
    assert "--out is empty" in one_error(capsys, lambda: demo.cli(["--quick", "--out", ""]))
    assert "--threads is -1" in one_error(capsys, lambda: study.cli(["--cfg", "synthetic/vanilla_resnet8", "--threads",
                                                                     "-1", "--dry-run"]))
    line = one_error(capsys, lambda: eval_cmd.cli(["--cfg", "synthetic/vanilla_resnet8", "--ckpt", str(tmp_path)]))
    assert f"checkpoint '{tmp_path}' is a folder; give a checkpoint file in it" in line


# -- config files and values --------------------------------------------------------------
@pytest.mark.parametrize("text,match", [
    ("SOLVER:\n  LR: [0.1\n", r"not valid YAML \(.* at line 3, column 1\)"),
    ("- a\n- b\n", "the top level is a list"),
    ("just a string\n", "the top level is a str"),
    ("# nothing\n", "holds no settings"),
    ("1: 2\n", "the key 1 is not a name"),
    ("SOLVER: 5\n", "SOLVER is 5, but it takes a section of settings"),
    ("SOLVER:\n  LR_DECAY_STAGES: [a, b]\n", r"SOLVER.LR_DECAY_STAGES is \['a', 'b'\]: the item 'a' is not a whole number"),
    ("SOLVER:\n  LR: null\n", r"SOLVER.LR is empty \(null\)"),
    ("SOLVER:\n  LR: .inf\n", "SOLVER.LR holds inf; give a finite number"),
])
def test_bad_config_files_are_config_errors(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_cfg(str(path))


def test_a_config_that_is_not_text_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\x00\xff\xfe")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_cfg(str(path))


@pytest.mark.parametrize("key,value,match", [
    ("SOLVER.LR_DECAY_STAGES", "['a','b']", "the item 'a' is not a whole number"),
    ("SOLVER.LR_DECAY_STAGES", "[[1],[2]]", r"the item \[1\] is not a whole number"),
    ("REVIEWKD.SHAPES", "['x']", "the item 'x' is not a whole number"),
    ("DETECTION.IMAGE_MEAN", "['a',0.5,0.5]", "the item 'a' is not a number"),
    ("SOLVER.EPOCHS", str(10 ** 23), "too large"),
    ("EXPERIMENT.SEED", str(10 ** 23), "too large"),
    ("SOLVER.LR", "1e400", "SOLVER.LR holds inf"),
    ("SOLVER.LR", "None", r"SOLVER.LR is empty \(null\)"),
    ("SOLVER.LR", "nan", "give a finite number"),
    ("SOLVER.MOMENTUM", "2", "write 2.0"),
    ("SOLVER.EPOCHS", "1.5", "SOLVER.EPOCHS is 1.5, but it takes a whole number such as 240"),
    ("SOLVER.LR_DECAY_STAGES", "[a,b]", "takes a list such as"),
])
def test_bad_override_values_are_config_errors(key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_cfg(None, [key, value])


def range_cases():
    """``(key, value, error message)``: a value just past each bound of every range rule of the config."""
    from mdistiller_blockkd.config import CFG, _RANGES, _WEIGHTS, _lookup

    rules = list(_RANGES.items()) + [(k, (0, None, "a loss weight")) for k in _WEIGHTS]
    for key, (low, high, what) in rules:
        default = _lookup(CFG, key)
        kind = type(default[0]) if isinstance(default, list) else type(default)
        bounds = [(b, op, step) for b, op, step in ((low, ">", -1), (high, "<", 1)) if b is not None]
        # a number is an inclusive bound (>=, <=), a text one (">0") a strict one
        words = " and ".join(f"{op} {b[1:]}" if isinstance(b, str) else f"{op}= {b}" for b, op, _ in bounds)
        for b, _, step in bounds:
            value = kind(b[1:]) if isinstance(b, str) else kind(b + step)  # the strict bound itself, or one past
            shown = f"[{value!r}] (item {value!r})" if isinstance(default, list) else repr(value)
            given = repr([value]) if isinstance(default, list) else repr(value)
            yield pytest.param(key, given, f"{key} is {shown}; it must be {words} ({what})", id=f"{key}={given}")


@pytest.mark.parametrize("key,value,message", list(range_cases()))
def test_every_range_rule_refuses_a_value_past_its_bound(key, value, message):
    with pytest.raises(ConfigError) as err:
        load_cfg(None, [key, value])
    assert str(err.value) == message


def test_every_shipped_config_passes_the_checks():
    for name in list_configs():
        load_cfg(name)


def test_train_with_a_yaml_syntax_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("SOLVER:\n  LR: [0.1\n")
    line = one_error(capsys, lambda: train.cli(["--cfg", str(bad)]))
    assert str(bad) in line and "not valid YAML" in line
    line = one_error(capsys, lambda: eval_cmd.cli(["--cfg", "synthetic/vanilla_resnet8", "--ckpt", str(bad),
                                                   "--batch-size", "0"]))
    assert "DATASET.TEST.BATCH_SIZE is 0" in line


# -- run files ------------------------------------------------------------------------------
def test_json_lines_drop_a_cut_last_line_and_refuse_damage(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "te')
    notes = []
    assert read_json_lines(path, notes) == [{"epoch": 1}, {"epoch": 2}]
    assert len(notes) == 1 and ":3: not valid JSON (the last line" in notes[0]
    path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON, and not the last line: the file is damaged"):
        read_json_lines(path)
    assert read_json_lines(path, notes, skip_damaged=True) == [{"epoch": 1}, {"epoch": 3}]


def test_resume_after_a_cut_last_record_and_refusal_of_a_damaged_file(tmp_path, capsys):
    assert train.cli(train_args(tmp_path, "SOLVER.EPOCHS", "2")) == 0
    metrics = tmp_path / "synthetic" / "vanilla_resnet8" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1][:30])  # killed while appending epoch 2's record
    capsys.readouterr()
    assert train.cli(train_args(tmp_path, "SOLVER.EPOCHS", "3", "--resume")) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "metrics.jsonl:2: not valid JSON (the last line" in out
    # the cut record of epoch 2 comes back from 'latest' (it holds the epoch's record), then epoch 3 runs
    assert "written from 'latest'" in out
    assert [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()] == [1, 2, 3]
    metrics.write_text('{"epoch": 1, "test_a\n' + "\n".join(metrics.read_text().splitlines()[1:]) + "\n")
    line = one_error(capsys, lambda: train.cli(train_args(tmp_path, "SOLVER.EPOCHS", "4", "--resume")))
    assert "cannot resume" in line and "metrics.jsonl:1: not valid JSON, and not the last line" in line


# -- report ---------------------------------------------------------------------------------
def write_run(root, name, cfg_text=None, lines=None, opts=()):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(cfg_text if cfg_text is not None else
                                   load_cfg(None, ["DISTILLER.TYPE", "KD", "SOLVER.EPOCHS", "2", *opts]).dump())
    recs = lines if lines is not None else [json.dumps({"epoch": e, "test_acc": 50.0 + e}) for e in (1, 2)]
    (d / "metrics.jsonl").write_text("\n".join(recs) + "\n")
    for name in ("latest", "student_latest", "ckpt_epoch_2.pth"):  # a finished run's final files
        (d / name).write_bytes(b"")
    return d


def test_report_skips_each_bad_run_folder_and_reports_the_others(tmp_path, capsys):
    root = tmp_path / "out"
    write_run(root, "good")
    good_cfg = (root / "good" / "config.yaml").read_text()
    write_run(root, "epochs_text", cfg_text=good_cfg.replace("EPOCHS: 2", "EPOCHS: abc"))
    write_run(root, "seed_text", cfg_text=good_cfg.replace("SEED: 0", "SEED: abc"))
    write_run(root, "node_text", cfg_text="DISTILLER: x\nSOLVER: [1]\n")
    write_run(root, "binary_cfg", cfg_text="")
    (root / "binary_cfg" / "config.yaml").write_bytes(b"\xff\xfe\x00")
    write_run(root, "epoch_text", lines=['{"epoch": 1, "test_acc": 50}', '{"epoch": "two", "test_acc": 51}'])
    write_run(root, "epoch_null", lines=['{"epoch": null, "test_acc": 50}'])
    write_run(root, "damaged", lines=['{"epoch": 1, "te', '{"epoch": 2, "test_acc": 52}'])
    assert report.main(["--root", str(root)]) == 0
    captured = capsys.readouterr()
    assert "1 runs (0 partial)" in captured.out and str(root / "good") in captured.out
    for name, why in [("epochs_text", "SOLVER.EPOCHS is 'abc'"), ("seed_text", "EXPERIMENT.SEED is 'abc'"),
                      ("node_text", "DISTILLER is 'x', not a section"), ("binary_cfg", "cannot be read"),
                      ("epoch_text", "epoch 'two'"), ("epoch_null", "epoch None"),
                      ("damaged", "not the last line: the file is damaged")]:
        assert any(name in w and why in w and w.endswith("skipped") for w in captured.err.splitlines()), (name, captured.err)


def test_report_outputs_of_the_wrong_kind_are_one_line(tmp_path, capsys):
    run = write_run(tmp_path / "out", "good")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for opts, words in [(["--out", str(tmp_path)], "is a folder; give a file path"),
                        (["--out", str(a_file / "r.md")], "which is a file, not a folder"),
                        (["--out", ""], "--out is empty"),
                        (["--plots", str(a_file)], "is a file, not a folder"),
                        (["--plots", str(a_file / "p")], "which is a file, not a folder")]:
        line = one_error(capsys, lambda: report.cli([str(run), *opts]))
        assert words in line, (opts, line)
    assert report.main([str(run), "--baseline", "FOO"]) == 0
    assert "--baseline FOO: no run of that method" in capsys.readouterr().err


# -- checkpoints ----------------------------------------------------------------------------
class _RunsACommand:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_a_checkpoint_with_foreign_objects_is_refused_in_plain_words(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _RunsACommand()}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "posix.system" in msg and "not plain tensors and containers" in msg and "does not unpickle" in msg
    assert "corrupt" not in msg and "weights_only=False" not in msg and "model.state_dict()" in msg


def test_compressed_checkpoints_are_refused_before_anything_is_inflated(tmp_path, monkeypatch):
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.zeros(1_000_000)}}, plain)  # 4 MB of zeros
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))
    assert deflated.stat().st_size < 100_000
    gz = tmp_path / "plain.pth.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))

    def never(*a, **k):
        raise AssertionError("torch.load must not be reached")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(CheckpointError, match="zip archive with compressed entries"):
        load_checkpoint(deflated)
    with pytest.raises(CheckpointError, match="gzip-compressed file, not a torch checkpoint"):
        load_checkpoint(gz)


# -- messages -------------------------------------------------------------------------------
def test_a_non_finite_box_term_points_at_the_boxes_not_the_learning_rate():
    from mdistiller_blockkd.engine.trainer import _StepLog

    def fail(terms):
        log = _StepLog(torch.device("cpu"))
        log.add(1, 2, sum(terms.values()), terms, torch.tensor(1))
        with pytest.raises(TrainingError) as e:
            log.flush(epoch=1, num_steps=5)
        return str(e.value)

    box = fail({"loss_classifier": torch.tensor(0.5), "loss_box_reg": torch.tensor(float("nan")),
                "loss_objectness": torch.tensor(0.1), "loss_rpn_box_reg": torch.tensor(0.2)})
    assert "only the box regression term (loss_box_reg) went non-finite" in box and "box annotations" in box
    ce = fail({"loss_ce": torch.tensor(float("inf")), "loss_kd": torch.tensor(1.0)})
    assert "loss_ce went non-finite: lower SOLVER.LR" in ce and "box" not in ce


def test_demo_resume_with_an_unreadable_stage_config_starts_it_afresh(tmp_path):
    (tmp_path / "config.yaml").write_bytes(b"\xff\xfe\x00")
    from mdistiller_blockkd.results.demo import same_config

    assert same_config(str(tmp_path), load_cfg(None)) is False
