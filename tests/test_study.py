"""tools/study.py: the configs x seeds grid, skipping finished runs, resuming killed ones, failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CFG = str(REPO / "configs" / "synthetic" / "vanilla_resnet8.yaml")


def tiny(prefix, epochs=1):
    return ["--", "DATASET.SYNTHETIC.TRAIN_SIZE", "64", "DATASET.SYNTHETIC.TEST_SIZE", "32", "SOLVER.EPOCHS", str(epochs),
            "LOG.PREFIX", str(prefix), "LOG.PROGRESS", "False"]


def study(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "mdistiller_blockkd", "study", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def epochs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["epoch"] for line in f if line.strip()]


def test_grid_runs_each_seed_then_skips_then_resumes(tmp_path):
    out = tmp_path / "out"
    r = study("--cfg", CFG, "--seeds", "0", "1", "--jobs", "2", "--threads", "1", *tiny(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    runs = {s: out / "synthetic" / f"vanilla_resnet8_s{s}" for s in (0, 1)}
    for s, d in runs.items():
        assert epochs(d) == [1]
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["EXPERIMENT"]["SEED"] == s and cfg["EXPERIMENT"]["NAME"] == f"vanilla_resnet8_s{s}"
        assert (out / "synthetic" / "logs" / f"vanilla_resnet8_s{s}.log").is_file()
    # the printed command reruns one cell alone
    assert "EXPERIMENT.SEED 1 EXPERIMENT.NAME vanilla_resnet8_s1" in r.stdout
    # rerun: nothing to do
    r = study("--cfg", CFG, "--seeds", "0", "1", *tiny(out), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("[done]") == 2 and "[start]" not in r.stdout
    # more epochs: the runs continue from 'latest'
    r = study("--cfg", CFG, "--seeds", "0", "--jobs", "1", *tiny(out, epochs=2), cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "[resume]" in r.stdout and epochs(runs[0]) == [1, 2] and epochs(runs[1]) == [1]


def test_a_failed_run_is_named_and_the_others_still_run(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"EXPERIMENT": {"NAME": "needs_teacher", "PROJECT": "synthetic"},
                                   "DISTILLER": {"TYPE": "KD", "TEACHER": "resnet8", "STUDENT": "resnet8",
                                                 "TEACHER_CKPT": str(tmp_path / "missing.pth")},
                                   "DATASET": {"TYPE": "synthetic", "NUM_WORKERS": 0}}))
    out = tmp_path / "out"
    r = study("--jobs", "1", "--threads", "1", "--cfg", str(bad), CFG, *tiny(out), cwd=tmp_path)
    assert r.returncode != 0
    assert "needs_teacher" in r.stderr and "failed" in r.stderr
    assert epochs(out / "synthetic" / "vanilla_resnet8") == [1]
    log = (out / "synthetic" / "logs" / "needs_teacher.log").read_text()
    assert "missing.pth" in log


def test_bad_arguments_are_one_clear_error(tmp_path):
    r = study("--cfg", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert r.returncode != 0 and "nope.yaml" in r.stderr and "not found" in r.stderr
    r = study("--cfg", CFG, CFG, "--dry-run", cwd=tmp_path)
    assert r.returncode != 0 and "same run directory" in r.stderr
    r = study("--cfg", CFG, "--", "SOLVER.EPOCHS", cwd=tmp_path)
    assert r.returncode != 0 and "KEY VALUE" in r.stderr


def test_a_cell_without_its_final_checkpoints_is_not_done(tmp_path):
    """A run stopped while saving its last epoch (the record written, 'latest' still at the epoch before) is resumed."""
    out = tmp_path / "out"
    assert study("--cfg", CFG, "--threads", "1", *tiny(out, epochs=2), cwd=tmp_path).returncode == 0
    run = out / "synthetic" / "vanilla_resnet8"
    os.replace(run / "epoch_1", run / "latest")  # 'latest' of epoch 1; the final files of epoch 2 missing
    for name in ("ckpt_epoch_2.pth", "student_latest"):
        os.remove(run / name)
    r = study("--cfg", CFG, "--threads", "1", *tiny(out, epochs=2), cwd=tmp_path)
    assert r.returncode == 0 and "[done]" not in r.stdout and "[resume]" in r.stdout, r.stdout + r.stderr
    assert epochs(run) == [1, 2] and (run / "ckpt_epoch_2.pth").is_file()
    r = study("--cfg", CFG, "--threads", "1", *tiny(out, epochs=2), cwd=tmp_path)
    assert r.returncode == 0 and "[done]" in r.stdout and "[start]" not in r.stdout


def test_a_cell_finished_after_the_plan_is_skipped_at_launch(tmp_path, monkeypatch):
    """A run finished by another process while the study waited (here: the same cell queued twice) is not retrained."""
    from mdistiller_blockkd.cluster.local import plan, run_cells

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    (cell,) = plan([CFG], [0], tiny(tmp_path / "out")[1:])
    said = []
    failed = run_cells([cell, cell], jobs=1, threads=1, echo=said.append)
    assert failed == [], said
    assert [m.split()[0] for m in said] == ["[todo]", "[todo]", "[start]", "[ok]", "[done]"], said
    assert "finished since the plan" in said[-1] and epochs(cell.out_dir) == [1]


def test_sigterm_stops_the_cells_and_a_rerun_resumes_them(tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    run = out / "synthetic" / "vanilla_resnet8"
    proc = subprocess.Popen([sys.executable, "-m", "mdistiller_blockkd", "study", "--cfg", CFG, "--threads", "1",
                             *tiny(out, epochs=500)], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = None
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").is_file() and epochs(run)):  # the cell has finished an epoch
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.2)
        child = int((run / ".lock").read_text())  # the train process holding the run folder
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
        assert "[stopped] vanilla_resnet8" in stdout and "terminated" in stderr and "Traceback" not in stderr
        with pytest.raises(ProcessLookupError):  # the study waited for its child: none is left running
            os.kill(child, 0)
        child = None
        done = max(epochs(run))
        assert done < 500 and not [n for n in os.listdir(run) if n.endswith(".tmp")]
        r = study("--cfg", CFG, "--threads", "1", *tiny(out, epochs=done + 1), cwd=tmp_path)
        assert r.returncode == 0 and "[resume]" in r.stdout and "[FAILED]" not in r.stdout, r.stdout + r.stderr
        assert epochs(run) == list(range(1, done + 2))
    finally:
        proc.kill()
        proc.wait()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_every_shipped_config_loads_and_names_known_models():
    from mdistiller_blockkd.engine.build import check_distiller_config
    from mdistiller_blockkd.errors import CheckpointError, ConfigError
    from mdistiller_blockkd.config import load_cfg

    paths = sorted(str(p) for p in (REPO / "configs").rglob("*.yaml"))
    assert len(paths) > 60
    from mdistiller_blockkd.detection.task import check_detection_config, is_detection

    for path in paths:
        cfg = load_cfg(path)
        try:
            (check_detection_config if is_detection(cfg) else check_distiller_config)(cfg)
        except CheckpointError as e:  # a teacher (or detection backbone) this clean checkout has not trained or downloaded
            assert "not found" in str(e) and (str(cfg.DISTILLER.TEACHER) in str(e)
                                              or "STUDENT_BACKBONE_CKPT" in str(e)), (path, e)
        except ConfigError as e:  # a local Hugging Face folder (hf:) this clean checkout does not hold
            assert str(e).startswith("hf: model folder 'data/models/") and "not found" in str(e), (path, e)


def test_study_configs_put_every_method_on_equal_footing():
    """Within a pair, every method shares data, recipe and teacher; the pairs share the recipe."""
    from mdistiller_blockkd.config import load_cfg

    root = REPO / "configs" / "fmnist" / "study"
    methods = {"vanilla", "kd", "dkd", "reviewkd", "blockkd", "blockkd_sample1"}
    recipes = []
    for pair in ("res56_res20", "vgg13_vgg8"):
        cfgs = {p.stem: load_cfg(str(p)) for p in (root / pair).glob("*.yaml")}
        assert set(cfgs) == methods
        recipe = {(c.DATASET.dump(), c.SOLVER.dump(), c.DISTILLER.STUDENT) for c in cfgs.values()}
        assert len(recipe) == 1, pair
        recipes.append((cfgs["kd"].DATASET.dump(), cfgs["kd"].SOLVER.dump()))
        teachers = {(c.DISTILLER.TEACHER, c.DISTILLER.TEACHER_CKPT) for k, c in cfgs.items() if k != "vanilla"}
        assert len(teachers) == 1, pair
        name, ckpt = teachers.pop()
        teacher_cfg = load_cfg(str(root / "teachers" / f"{name}.yaml"))
        assert ckpt == f"{teacher_cfg.LOG.PREFIX}/{teacher_cfg.EXPERIMENT.PROJECT}/{teacher_cfg.EXPERIMENT.NAME}/student_best"
        assert cfgs["vanilla"].DISTILLER.TYPE == "NONE" and cfgs["blockkd_sample1"].BLOCKKD.STONES == "sample:1"
        assert len({c.EXPERIMENT.NAME for c in cfgs.values()}) == len(methods)
    assert recipes[0] == recipes[1]


def test_wordnet_text_study_configs_share_recipe_and_teacher():
    """The text study: teacher and students share data and recipe; every distiller learns from the teacher
    config's seed-0 run; the student is 3 of the teacher's layers; names are unique."""
    from mdistiller_blockkd.config import load_cfg

    root = REPO / "configs" / "wordnet"
    teacher = load_cfg(str(root / "teachers" / "minilm_l6.yaml"))
    cfgs = {p.stem: load_cfg(str(p)) for p in (root / "minilm_l6_l3").glob("*.yaml")}
    assert set(cfgs) == {"vanilla", "kd", "dkd", "lskd", "blockkd", "blockkd_last2"}
    assert {(c.DATASET.dump(), c.SOLVER.dump()) for c in cfgs.values()} == {(teacher.DATASET.dump(), teacher.SOLVER.dump())}
    assert teacher.DISTILLER.TYPE == "NONE" and teacher.SOLVER.TYPE == "AdamW" and teacher.SOLVER.BATCH_SIZE == 32
    run = f"{teacher.LOG.PREFIX}/{teacher.EXPERIMENT.PROJECT}/{teacher.EXPERIMENT.NAME}_s0/student_best"
    for name, c in cfgs.items():
        assert c.DISTILLER.TEACHER == teacher.DISTILLER.STUDENT and c.DISTILLER.TEACHER_CKPT == run, name
        assert c.DISTILLER.STUDENT == f"{teacher.DISTILLER.STUDENT},layers=3,pick=every_other", name
    assert cfgs["vanilla"].DISTILLER.TYPE == "NONE" and cfgs["blockkd_last2"].BLOCKKD.STONES == "last:2"
    assert {cfgs[k].BLOCKKD.CONNECTOR for k in ("blockkd", "blockkd_last2")} == {"linear_ln"}
    assert len({c.EXPERIMENT.NAME for c in cfgs.values()} | {teacher.EXPERIMENT.NAME}) == len(cfgs) + 1


def test_study600_configs_share_split_recipe_and_teacher():
    """The 600-step study: every method and variant of a pair shares the validation split, data, recipe
    (the equal-cost *_2x and *_1.25x files differ only in epochs and decay stages) and teacher; names are unique."""
    from mdistiller_blockkd.config import load_cfg

    root = REPO / "configs" / "fmnist" / "study600"
    names, recipes = set(), []
    for pair in ("res56_res20", "vgg13_vgg8"):
        cfgs = {p.stem: load_cfg(str(p)) for p in (root / pair).glob("*.yaml")}
        assert {"vanilla", "kd", "dkd", "lskd", "reviewkd", "blockkd", "kd_2x", "dkd_2x"} <= set(cfgs)
        assert all(c.DATASET.VAL_SPLIT == 5000 and c.EXPERIMENT.PROJECT == "fmnist_study600" for c in cfgs.values())
        same = {(c.DATASET.dump(), c.DISTILLER.STUDENT) for c in cfgs.values()}
        assert len(same) == 1, pair
        solver = {c.SOLVER.dump() for k, c in cfgs.items() if not k.endswith("x")}
        assert len(solver) == 1, pair
        # equal-cost runs: Block-KD all's budget (2x) and last:2's (1.25x), decay stages scaled alike
        for suffix, epochs, stages in (("_2x", 24, [16, 22]), ("_1.25x", 15, [10, 14])):
            for m in ("kd", "dkd"):
                c = cfgs[m + suffix]
                assert (c.SOLVER.EPOCHS, list(c.SOLVER.LR_DECAY_STAGES)) == (epochs, stages)
                assert c.SOLVER.LR == cfgs[m].SOLVER.LR and c.DISTILLER.TYPE == cfgs[m].DISTILLER.TYPE
                assert c.EXPERIMENT.NAME == f"{pair}_{m}{suffix}"
        assert len({(c.DISTILLER.TEACHER, c.DISTILLER.TEACHER_CKPT) for k, c in cfgs.items() if k != "vanilla"}) == 1
        # Block-KD variants differ from blockkd.yaml in BLOCKKD only
        base = cfgs["blockkd"]
        for k, c in cfgs.items():
            if k.startswith("blockkd"):
                assert c.DISTILLER.dump() == base.DISTILLER.dump() and c.LOG.dump() == base.LOG.dump(), k
        names |= {c.EXPERIMENT.NAME for c in cfgs.values()}
        recipes.append(solver.pop())
        assert sum(1 for _ in (root / pair).glob("*.yaml")) == len(cfgs)
    assert recipes[0] == recipes[1]
    assert len(names) == sum(1 for p in root.rglob("*.yaml") if "_base" not in p.parts)


def test_study600_configs_are_a_base_per_pair_and_small_overrides(tmp_path):
    """Each study600 config is its pair's _base/recipe.yaml (Block-KD variants: _base/blockkd.yaml) plus a few
    lines; _BASE_ merges nested keys, resolves relative paths, and refuses a missing base or a cycle."""
    from mdistiller_blockkd.config import load_cfg
    from mdistiller_blockkd.errors import ConfigError

    root = REPO / "configs" / "fmnist" / "study600"
    for path in root.glob("*/*.yaml"):
        body = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        assert body[0].startswith("_BASE_: _base/") and len(body) <= 10, path
    cfg = load_cfg(str(root / "res56_res20" / "blockkd_t2.yaml"))
    assert (cfg.BLOCKKD.T, cfg.BLOCKKD.WARMUP, cfg.BLOCKKD.DETACH_ENSEMBLE, cfg.SOLVER.LR) == (2.0, 2, True, 0.05)
    (tmp_path / "a.yaml").write_text("_BASE_: b.yaml\nSOLVER: {LR: 0.1}\n")
    (tmp_path / "b.yaml").write_text("SOLVER: {LR: 0.2, EPOCHS: 7}\n")
    c = load_cfg(str(tmp_path / "a.yaml"))
    assert (c.SOLVER.LR, c.SOLVER.EPOCHS) == (0.1, 7)
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="leads back to a file already read"):
        load_cfg(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("_BASE_: nope.yaml\n")
    with pytest.raises(ConfigError, match="_BASE_ 'nope.yaml' not found"):
        load_cfg(str(tmp_path / "c.yaml"))


def test_configs_with_recorded_runs_pin_the_changed_default():
    """DETACH_ENSEMBLE's default became False after the 600-step ablations. Every config whose runs are
    recorded in the docs (the studies, the demo, the Fashion-MNIST detection set) names it, so those runs
    reproduce whatever the default; the study's `all` row keeps the detached ensemble, `nodetach` rows not."""
    from mdistiller_blockkd.config import CFG, load_cfg

    assert CFG.BLOCKKD.DETACH_ENSEMBLE is False
    recorded = [*(REPO / "configs" / "fmnist").rglob("blockkd*.yaml"), REPO / "configs" / "demo" / "blockkd.yaml",
                REPO / "configs" / "detection" / "fmnist_det" / "blockkd.yaml"]
    assert len(recorded) > 40
    for path in recorded:
        chain = [path]  # the file and its _BASE_ files: one of them names the setting
        while "_BASE_" in yaml.safe_load(chain[-1].read_text()):
            chain.append(chain[-1].parent / yaml.safe_load(chain[-1].read_text())["_BASE_"])
        assert any("DETACH_ENSEMBLE" in (yaml.safe_load(p.read_text()).get("BLOCKKD") or {}) for p in chain), path
        assert load_cfg(str(path)).BLOCKKD.DETACH_ENSEMBLE is ("nodetach" not in path.stem), path
