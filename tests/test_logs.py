"""What a run writes while it works (mdistiller_blockkd.utils.console) and its wandb run (utils.wandb_log).

A log file (not a terminal) holds plain lines: no carriage returns, no colour escapes; a terminal
keeps tqdm's bars and mdistiller's colours; NO_COLOR turns colours off. With LOG.WANDB an offline
wandb run holds the same scalars as tensorboard, read back here from wandb's own transaction log.
"""

import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from mdistiller_blockkd.config import load_cfg, log_msg
from mdistiller_blockkd.errors import ConfigError
from mdistiller_blockkd.utils.console import Progress, ProgressEvery, colour_on

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "synthetic" / "vanilla_resnet8.yaml")
TINY = ["DATASET.SYNTHETIC.TRAIN_SIZE", "64", "DATASET.SYNTHETIC.TEST_SIZE", "32", "SOLVER.BATCH_SIZE", "16",
        "DATASET.TEST.BATCH_SIZE", "16", "SOLVER.EPOCHS", "1", "LOG.PROGRESS", "True"]


def env(**extra):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
    e.pop("NO_COLOR", None)
    return e


def train_args(prefix, *extra):
    return [sys.executable, "-m", "mdistiller_blockkd", "train", "--cfg", SMOKE, "--brief", "LOG.PREFIX", str(prefix),
            *TINY, *extra]


# -- console ---------------------------------------------------------------------------------


def test_a_log_file_holds_plain_lines(tmp_path):
    r = subprocess.run(train_args(tmp_path, "LOG.PROGRESS_EVERY_PCT", "50"), env=env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "\r" not in out and "\x1b[" not in out, out
    assert "[INFO] data: synthetic" in r.stdout and "[EVAL] epoch 1/1" in r.stdout
    # 4 steps, a line every 50 %: after steps 2 and 4; the evaluation (2 batches) too
    lines = [line for line in r.stdout.splitlines() if line.startswith("epoch 1/1: ")]
    assert [line.split(" steps")[0] for line in lines] == ["epoch 1/1: 2/4", "epoch 1/1: 4/4"]
    assert "(50%)" in lines[0] and "loss=" in lines[0] and "lr=0.05" in lines[0]
    assert any(line.startswith("eval 1: 2/2 steps (100%)") for line in r.stdout.splitlines())


def test_a_terminal_keeps_bars_and_colours(tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    proc = subprocess.Popen(train_args(tmp_path), env=env(TERM="xterm"), stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            raise AssertionError("the run printed nothing for 120 s")
        try:
            data = os.read(master, 65536)
        except OSError:  # the pty is closed once the run exits
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    out = b"".join(chunks).decode("utf-8", "replace")
    assert "\x1b[36m[INFO] data: synthetic" in out and "\x1b[31m[EVAL] epoch 1/1" in out
    assert "\repoch 1/1:" in out  # tqdm's bar, redrawn in place
    assert "steps (" not in out  # no plain progress lines on a terminal


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_colours_only_on_a_terminal_and_never_with_NO_COLOR(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert log_msg("hi") == "[INFO] hi" and not colour_on()
    monkeypatch.setattr(sys, "stdout", _Tty())
    assert log_msg("hi") == "\x1b[36m[INFO] hi\x1b[0m"
    monkeypatch.setenv("NO_COLOR", "")  # empty: not set (no-color.org)
    assert colour_on()
    monkeypatch.setenv("NO_COLOR", "1")
    assert log_msg("hi", "EVAL") == "[EVAL] hi" and not colour_on()


def test_progress_lines_every_seconds_or_percent():
    now = [0.0]

    def lines(total, every, times):
        out = io.StringIO()
        p = Progress(total, "epoch 1/9", every, stream=out, bar_stream=io.StringIO(), clock=lambda: now[0])
        p.set_postfix(loss="1.000")
        for t in times:
            now[0] = t
            p.update(1)
        p.close()
        return [line.split(" steps")[0] for line in out.getvalue().splitlines()]

    now[0] = 0.0
    assert lines(10, ProgressEvery(seconds=0, percent=25), [1] * 10) == \
        ["epoch 1/9: 3/10", "epoch 1/9: 5/10", "epoch 1/9: 8/10", "epoch 1/9: 10/10"]
    now[0] = 0.0
    assert lines(5, ProgressEvery(seconds=10, percent=0), [4, 9, 10, 15, 31]) == \
        ["epoch 1/9: 3/5", "epoch 1/9: 5/5"]
    now[0] = 0.0
    assert lines(5, ProgressEvery(seconds=0, percent=0), [100] * 5) == []
    out = io.StringIO()
    now[0] = 0.0
    p = Progress(4, "eval", ProgressEvery(0, 50), stream=out, bar_stream=io.StringIO(), clock=lambda: now[0])
    now[0] = 6.0
    p.update(2)
    assert out.getvalue() == "eval: 2/4 steps (50%), 6 s, eta 6 s\n"
    quiet = io.StringIO()
    Progress(4, "eval", None, stream=quiet).update(4)  # LOG.PROGRESS False
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("opts, needle", [
    (["LOG.PROGRESS_EVERY_PCT", "101"], "LOG.PROGRESS_EVERY_PCT is 101"),
    (["LOG.PROGRESS_EVERY_S", "-1.0"], "LOG.PROGRESS_EVERY_S is -1.0"),
    (["LOG.WANDB_MODE", "dryrun"], "LOG.WANDB_MODE is 'dryrun'"),
    (["LOG.WANDB_PROJECT", "a/b"], "LOG.WANDB_PROJECT is 'a/b'"),
    (["LOG.WANDB_ENTITY", "me:you"], "LOG.WANDB_ENTITY is 'me:you'"),
])
def test_log_options_are_checked(opts, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_cfg(SMOKE, opts)


# -- wandb -----------------------------------------------------------------------------------


def test_mdistiller_yamls_leave_wandb_off():
    """Upstream's default is LOG.WANDB True; a shipped (mdistiller-format) YAML that does not set it logs no wandb."""
    from mdistiller_blockkd.config import shipped_config

    path = shipped_config("cifar100/kd/res56_res20")
    assert "WANDB" not in Path(path).read_text()
    assert load_cfg(path).LOG.WANDB is False



def wandb_records(run_dir):
    """The records of an offline wandb run (``run-<id>.wandb``, wandb's LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("run-*.wandb")
    data, block, pos, parts, records = path.read_bytes(), 32768, 7, [], []  # 7: the ':W&B' file header
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def wandb_history(run_dir):
    rows, config, summary, run_id = [], {}, {}, None
    for r in wandb_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "run":
            run_id = r.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    return run_id, rows, config, summary


def wandb_env(tmp_path):
    return env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb_dir"), WANDB_SILENT="true", WANDB_CONSOLE="off",
               WANDB__DISABLE_STATS="true", WANDB_API_KEY="")


@pytest.mark.slow
def test_an_offline_wandb_run_holds_the_metrics_and_resumes(tmp_path):
    pytest.importorskip("wandb")
    folder = tmp_path / "synthetic" / "vanilla_resnet8"
    wenv = wandb_env(tmp_path)
    r = subprocess.run(train_args(tmp_path, "LOG.WANDB", "True", "LOG.TENSORBOARD_FREQ", "2"), env=wenv,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    run_id = (folder / "wandb_run_id").read_text().strip()
    (first,) = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
    got_id, rows, config, summary = wandb_history(first)
    assert got_id == run_id
    record = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
    epoch_rows = [row for row in rows if "epoch/test_acc" in row]
    assert len(epoch_rows) == 1 and epoch_rows[0]["_step"] == 4  # epoch 1 of 4 steps, as in tensorboard
    assert {k: epoch_rows[0][f"epoch/{k}"] for k in record if k != "epoch"} == \
        pytest.approx({k: v for k, v in record.items() if k != "epoch"})
    assert [row["_step"] for row in rows if "train/loss" in row] == [2, 4]  # LOG.TENSORBOARD_FREQ 2
    assert all("train/lr" in row for row in rows if "train/loss" in row)
    assert config["SOLVER"]["EPOCHS"] == 1 and config["LOG"]["WANDB"] is True
    assert summary["best_acc"] == pytest.approx(record["best_acc"])

    # --resume continues the same wandb run
    r = subprocess.run(train_args(tmp_path, "LOG.WANDB", "True", "LOG.TENSORBOARD_FREQ", "2", "SOLVER.EPOCHS", "2",
                                  "--resume"), env=wenv, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    (second,) = set((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")) - {first}
    got_id, rows, _, summary = wandb_history(second)
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[1])
    assert got_id == run_id and (folder / "wandb_run_id").read_text().strip() == run_id
    assert [row["_step"] for row in rows if "epoch/test_acc" in row] == [8]
    assert [row["epoch/test_acc"] for row in rows if "epoch/test_acc" in row] == [pytest.approx(last["test_acc"])]
    assert summary["best_acc"] == pytest.approx(last["best_acc"])


def test_wandb_asked_for_but_missing_is_one_error_line(tmp_path):
    code = ("import sys; sys.modules['wandb'] = None\n"  # import wandb now fails as if it were not installed
            "from mdistiller_blockkd.cli.train import cli\n"
            f"sys.exit(cli({train_args(tmp_path, 'LOG.WANDB', 'True')[4:]!r}))")
    r = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: LOG.WANDB is True but wandb is not installed; install the [wandb] extra "
        "(pip install 'mdistiller_blockkd[wandb]') or set LOG.WANDB False"]
    assert not (tmp_path / "synthetic").exists()  # stopped before any work


def test_wandb_that_cannot_start_is_one_clear_error(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from mdistiller_blockkd.utils.wandb_log import ID_FILE, open_wandb

    def refuse(**kw):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", refuse)
    cfg = load_cfg(SMOKE, ["LOG.WANDB", "True"])
    with pytest.raises(ConfigError, match=r"^LOG.WANDB: wandb could not start the run \(No API key configured.*"
                                          r"set LOG.WANDB_MODE offline"):
        open_wandb(cfg, str(tmp_path), "run", resume=False)
    assert open_wandb(load_cfg(SMOKE), str(tmp_path), "run", resume=False) is None  # LOG.WANDB False: no wandb
    # the id kept for --resume: a fresh start draws a new one, a resume reads it back
    seen = []
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.append(kw) or object())
    open_wandb(cfg, str(tmp_path), "run", resume=False)
    first = (tmp_path / ID_FILE).read_text().strip()
    open_wandb(cfg, str(tmp_path), "run", resume=True)
    open_wandb(cfg, str(tmp_path), "run", resume=False)
    assert [kw["id"] for kw in seen[:2]] == [first, first] and seen[2]["id"] != first and len(first) == 8
    assert seen[0]["project"] == "synthetic" and seen[0]["entity"] is None and seen[0]["mode"] is None
    assert seen[0]["tags"] == ["vanilla", "resnet8", "synthetic"] and seen[0]["config"]["LOG"]["WANDB"] is True
