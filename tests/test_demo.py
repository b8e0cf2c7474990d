"""tools/demo.py: the --quick path end to end, --resume, the results table and the teacher check."""

import json
import os
from pathlib import Path

import pytest
import yaml

from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.errors import ConfigError
from mdistiller_blockkd.utils.precision import resolve_config_amp

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cmd():
    """The demo command (arguments, main)."""
    from mdistiller_blockkd.cli import demo as mod

    return mod


@pytest.fixture(scope="module")
def demo():
    """The demo's library (stages, their state, results)."""
    from mdistiller_blockkd.results import demo as mod

    return mod


@pytest.fixture(scope="module")
def quick_out(cmd, tmp_path_factory):
    """One --quick demo (every stage 1 epoch on 128/100 embedded images); returns (out dir, stdout)."""
    out = tmp_path_factory.mktemp("demo_quick")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cmd.main(["--quick", "--out", str(out), "LOG.PROGRESS", "False"]) == 0
    return out, buf.getvalue()


def table_rows(text):
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    return lines[1:]  # without the header


def test_configs_are_the_documented_demo(demo):
    cfgs = {s.name: load_cfg(s.yaml) for s in demo.STAGES}
    for name, cfg in cfgs.items():
        assert cfg.DATASET.TYPE == "fashion_mnist" and cfg.DATASET.ROOT == "embedded", name
        assert cfg.DATASET.NUM_WORKERS == 0, name
        assert cfg.EXPERIMENT.NAME == name and cfg.EXPERIMENT.PROJECT == demo.RUNS
    assert [cfgs[n].DISTILLER.TYPE for n in ("teacher", "vanilla", "kd", "blockkd")] == ["NONE", "NONE", "KD", "BLOCKKD"]
    students = {cfgs[n].DISTILLER.STUDENT for n in ("vanilla", "kd", "blockkd")}
    assert len(students) == 1 and students != {cfgs["teacher"].DISTILLER.STUDENT}
    assert {cfgs[n].DISTILLER.TEACHER for n in ("kd", "blockkd")} == {cfgs["teacher"].DISTILLER.STUDENT}
    recipe = {(c.SOLVER.EPOCHS, tuple(c.SOLVER.LR_DECAY_STAGES), c.SOLVER.LR, c.SOLVER.BATCH_SIZE,
               c.SOLVER.WEIGHT_DECAY, c.EXPERIMENT.SEED) for n, c in cfgs.items() if n != "teacher"}
    assert len(recipe) == 1  # the three students share recipe and seed
    teacher = cfgs["teacher"].SOLVER
    assert (teacher.LR, teacher.BATCH_SIZE, teacher.WEIGHT_DECAY) == next(iter(recipe))[2:5]


def test_epoch_overrides(cmd, demo):
    args = cmd.parse_args(["--epochs", "4", "--teacher-epochs", "6", "--seed", "2"])
    by_name = {s.name: demo.stage_cfg(s, demo.stage_overrides(s, args)) for s in demo.STAGES}
    assert by_name["teacher"].SOLVER.EPOCHS == 6 and by_name["kd"].SOLVER.EPOCHS == 4
    assert list(by_name["teacher"].SOLVER.LR_DECAY_STAGES) == demo.scale_decay(
        list(load_cfg("demo/teacher").SOLVER.LR_DECAY_STAGES),
        load_cfg("demo/teacher").SOLVER.EPOCHS, 6)
    assert all(c.EXPERIMENT.SEED == 2 and c.LOG.PREFIX == cmd.DEFAULT_OUT for c in by_name.values())
    quick = cmd.parse_args(["--quick", "--teacher-epochs", "2"])
    assert (quick.epochs, quick.teacher_epochs) == (1, 2)


def test_quick_demo_end_to_end(demo, quick_out):
    out, text = quick_out
    assert "fashion_mnist from" in text and "fashion_mnist_mini" in text  # says which data
    assert "train 128 of 3000" in text
    rows = table_rows(text)
    assert len(rows) == 4
    for row, stage in zip(rows, demo.STAGES):
        assert row.startswith(f"| {stage.label} |")
        assert "not run" not in row
    assert "stone1" in rows[3] and "teacher" in rows[3]  # Block-KD's stones and teacher
    assert "- |" in rows[1]  # no stones for vanilla
    for stage in demo.STAGES:
        folder = os.path.join(out, "runs", stage.name)
        assert os.path.isfile(os.path.join(folder, "metrics.jsonl"))
        assert os.path.isfile(os.path.join(folder, "student_best"))
        cfg = yaml.safe_load(open(os.path.join(folder, "config.yaml")))
        assert cfg["LOG"]["PREFIX"] == str(out) and cfg["SOLVER"]["EPOCHS"] == 1
        if stage.needs_teacher:
            assert cfg["DISTILLER"]["TEACHER_CKPT"] == os.path.join(str(out), "runs", "teacher", "student_best")
    md = open(os.path.join(out, "demo_results.md")).read()
    assert len(table_rows(md)) == 4 and "plots:" in md
    # pictures by default: matplotlib is a dependency, so the plots are drawn after a plain install
    assert "skipped" not in md and open(os.path.join(out, "plots", "test_acc.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "total wall time" in text and str(out) in text


def test_resume_after_completion_only_prints(cmd, demo, quick_out, capsys):
    out, _ = quick_out
    before = {s.name: os.stat(os.path.join(out, "runs", s.name, "latest")).st_mtime_ns for s in demo.STAGES}
    assert cmd.main(["--quick", "--out", str(out), "--resume", "LOG.PROGRESS", "False"]) == 0
    text = capsys.readouterr().out
    assert text.count("; kept") == 4 and "-- training" not in text and "[EVAL]" not in text
    after = {s.name: os.stat(os.path.join(out, "runs", s.name, "latest")).st_mtime_ns for s in demo.STAGES}
    assert before == after
    assert len(table_rows(text)) == 4


def test_plan_stage(cmd, demo, quick_out):
    out, _ = quick_out
    args = cmd.parse_args(["--quick", "--out", str(out), "LOG.PROGRESS", "False"])
    kd = demo.STAGES[2]
    cfg = demo.stage_cfg(kd, demo.stage_overrides(kd, args))
    assert demo.plan_stage(kd, cfg, str(out), resume=False) == ("fresh", "")
    assert demo.plan_stage(kd, cfg, str(out), resume=True)[0] == "skip"  # config.yaml holds what auto chose
    other_seed = demo.stage_cfg(kd, demo.stage_overrides(kd, cmd.parse_args(
        ["--quick", "--out", str(out), "--seed", "3", "LOG.PROGRESS", "False"])))
    action, reason = demo.plan_stage(kd, other_seed, str(out), resume=True)
    assert action == "fresh" and "config" in reason
    # an interrupted run (latest at epoch 1 of 2, same settings) is continued
    two = demo.stage_cfg(kd, demo.stage_overrides(kd, cmd.parse_args(
        ["--quick", "--epochs", "2", "--out", str(out), "LOG.PROGRESS", "False"])))
    folder = os.path.join(out, "runs", "kd")
    saved = open(os.path.join(folder, "config.yaml")).read()
    mark = open(os.path.join(folder, demo.TEACHER_MARK)).read()
    try:
        recorded = two.clone()  # as the trainer writes it: SOLVER.AMP auto resolved (the demo's configs use auto)
        resolve_config_amp(recorded)
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            f.write(recorded.dump())
        assert demo.plan_stage(kd, two, str(out), resume=True) == ("resume", "continuing after epoch 1")
        with open(os.path.join(folder, demo.TEACHER_MARK), "w") as f:
            f.write("0" * 64 + "\n")
        action, reason = demo.plan_stage(kd, two, str(out), resume=True)
        assert action == "fresh" and "another teacher" in reason
    finally:
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            f.write(saved)
        with open(os.path.join(folder, demo.TEACHER_MARK), "w") as f:
            f.write(mark)


def test_teacher_check_on_fabricated_numbers(demo):
    ok, msg = demo.teacher_check(84.0, 81.5)
    assert ok and msg.startswith("check passed") and "2.50 points" in msg
    ok, msg = demo.teacher_check(80.3, 79.5)  # ahead, but by less than a point
    assert not ok and msg.startswith("WARNING") and "+0.80" in msg
    ok, msg = demo.teacher_check(78.0, 80.0)
    assert not ok and "WARNING" in msg and "-2.00" in msg
    assert demo.teacher_check(81.0, 80.0)[0]  # exactly the margin passes
    ok, msg = demo.teacher_check(None, 80.0)
    assert not ok and "WARNING" in msg


def _fake_run(root, stage, kind, student, accs, teacher="resnet32", stones=False):
    folder = os.path.join(root, "runs", stage)
    os.makedirs(folder)
    cfg = {"DATASET": {"TYPE": "fashion_mnist"}, "EXPERIMENT": {"SEED": 0},
           "DISTILLER": {"TYPE": kind, "STUDENT": student, "TEACHER": teacher}, "SOLVER": {"EPOCHS": len(accs)}}
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for e, acc in enumerate(accs, 1):
            rec = {"epoch": e, "test_acc": acc, "epoch_time_s": 10.0, "ms_per_step": 100.0 + e}
            if stones:
                rec.update({"acc_stone1": 50.0 + e, "acc_stone2": 60.0 + e, "acc_teacher": 77.0})
            f.write(json.dumps(rec) + "\n")


def test_table_and_warning_on_fabricated_runs(demo, tmp_path):
    root = str(tmp_path)
    _fake_run(root, "teacher", "NONE", "resnet32", [70.0, 77.0, 76.5])
    _fake_run(root, "vanilla", "NONE", "resnet8", [72.0, 78.5, 78.0])  # better than the teacher
    _fake_run(root, "kd", "KD", "resnet8", [71.0, 78.0, 77.9])
    _fake_run(root, "blockkd", "BLOCKKD", "resnet8", [70.0, 79.0], stones=True)  # partial: 2 of 2 planned
    text, ok, check = demo.results_text(root, demo.stage_runs(root), "fashion_mnist from somewhere", quick=False)
    assert not ok and check.startswith("WARNING") and check in text
    rows = table_rows(text)
    assert len(rows) == 4
    assert rows[0].startswith("| teacher (vanilla) | resnet32 | 3 | 77.00 | 76.50 | 30 | 102 |")
    assert rows[1].startswith("| student vanilla | resnet8 | 3 | 78.50 | 78.00 |")
    assert rows[3].endswith("| stone1 52.00, stone2 62.00, teacher 77.00 |")
    assert "data: fashion_mnist from somewhere" in text

    # a missing stage is a row saying so; a clear teacher passes
    root2 = str(tmp_path / "b")
    _fake_run(root2, "teacher", "NONE", "resnet32", [85.0])
    _fake_run(root2, "vanilla", "NONE", "resnet8", [80.0])
    text, ok, check = demo.results_text(root2, demo.stage_runs(root2), "x", quick=False)
    rows = table_rows(text)
    assert ok and len(rows) == 4 and rows[2].endswith("not run |") and "WARNING" not in text


def test_partial_row_and_decay_scaling(demo, tmp_path):
    from mdistiller_blockkd.results.tables import summary_table

    root = str(tmp_path)
    _fake_run(root, "teacher", "NONE", "resnet32", [50.0])
    with open(os.path.join(root, "runs", "teacher", "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["SOLVER"]["EPOCHS"] = 5
    with open(os.path.join(root, "runs", "teacher", "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    _fake_run(root, "vanilla", "NONE", "resnet8", [50.0])
    with open(os.path.join(root, "runs", "vanilla", "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"epoch": 1}) + "\n")  # no evaluated epoch: no result
    runs = demo.stage_runs(root)
    assert runs[0].epochs == 1 and runs[0].planned_epochs == 5 and runs[1:] == [None, None, None]
    table = summary_table([(s.label, r) for s, r in zip(demo.STAGES, runs)])
    assert "| teacher (vanilla) | resnet32 | 1 of 5 (partial) | 50.00 | 50.00 | 10 | 101 | - |" in table
    assert "| student vanilla | - | 0 | - | - | - | - | not run |" in table
    assert demo.scale_decay([7, 9], 10, 10) == [7, 9]
    assert demo.scale_decay([7, 9], 10, 20) == [14, 18]
    assert demo.scale_decay([7, 9], 10, 1) == []
    assert demo.scale_decay([7, 9], 10, 3) == [2]


def test_bad_arguments(cmd):
    with pytest.raises(ConfigError, match="--epochs"):
        cmd.parse_args(["--epochs", "0"])
    with pytest.raises(ConfigError, match="--teacher-epochs"):
        cmd.parse_args(["--teacher-epochs", "-1"])
    with pytest.raises(ConfigError, match="KEY VALUE"):
        cmd.parse_args(["SOLVER.LR"])
    with pytest.raises(ConfigError, match="--out after the KEY VALUE overrides"):
        cmd.parse_args(["SOLVER.LR", "0.1", "--out", "x"])
    late = cmd.parse_args(["SOLVER.LR", "0.1", "--resume"])  # switches may follow the overrides
    assert late.resume and late.opts == ["SOLVER.LR", "0.1"]
    args = cmd.parse_args(["--quick"])
    assert args.epochs == 1 and args.teacher_epochs == 1 and args.out == cmd.QUICK_OUT
    assert cmd.parse_args([]).out == cmd.DEFAULT_OUT
