"""study --executor slurm (mdistiller_blockkd.cluster.slurm): options, the jobs' commands, run states and
resubmission without Slurm; then a real study on a one-node Slurm (.ci/slurm_up), compared with the local study,
a cancelled job resumed by rerunning the command, and a job requeued by submitit's SIGUSR2.

The tests that need Slurm are skipped where ``sinfo`` is missing or no controller answers; with
``MDKD_REQUIRE_SLURM=1`` (set by .ci/run) they fail instead.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mdistiller_blockkd.cluster.local import Cell
from mdistiller_blockkd.cluster import slurm
from mdistiller_blockkd.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
CFG = str(REPO / "configs" / "synthetic" / "vanilla_resnet8.yaml")


def study(*args, cwd, env=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mdistiller_blockkd", "study", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def cell(tmp_path, name="run", epochs=2):
    out = tmp_path / "out" / "synthetic" / name
    return Cell(CFG, 0, name, str(out), str(tmp_path / "out" / "synthetic" / "logs" / f"{name}.log"), epochs,
                ["EXPERIMENT.NAME", name])


def finish_epochs(c, n):
    """The records (and, for the last epoch, the final files) of ``n`` epochs in the cell's run folder."""
    from mdistiller_blockkd.utils.runfolder import final_files

    os.makedirs(c.out_dir, exist_ok=True)
    with open(os.path.join(c.out_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"epoch": e + 1, "test_acc": 10.0}) + "\n" for e in range(n))
    if n == c.epochs:
        for name in final_files(n):
            Path(c.out_dir, name).write_text("")


# -- without Slurm ---------------------------------------------------------------------------


def test_time_limits_in_slurm_formats():
    assert [slurm.parse_time(t) for t in ("90", "1:30", "4:00:00", "1-0", "2-00:00:00", "0:0:59")] == \
        [90, 2, 240, 1440, 2880, 1]
    for bad in ("1:2:3:4", "4h", "0", ""):
        with pytest.raises(ConfigError, match="--time"):
            slurm.parse_time(bad)


def test_a_job_with_several_gpus_runs_torchrun(tmp_path):
    c = cell(tmp_path)
    plain = c.command(False)
    assert slurm.launch_command(plain, 0) == slurm.launch_command(plain, 1) == plain
    cmd = slurm.launch_command(plain, 4)
    assert cmd[:9] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                       "-m", "mdistiller_blockkd", "train"]
    assert cmd[9:] == plain[4:]
    # the job resumes when the run folder holds 'latest' (checked when it starts, not when it is submitted)
    job = slurm.train_job(c, slurm.SlurmOptions(time="10", cpus_per_task=8, gpus_per_task=2))
    assert job.command() == slurm.launch_command(c.command(False), 2) and "--resume" not in job.command()
    assert job.env["OMP_NUM_THREADS"] == "4"  # 8 CPUs over 2 processes
    os.makedirs(c.out_dir)
    Path(c.out_dir, "latest_step").write_text("")  # stopped in its first epoch: only the mid-epoch checkpoint
    assert job.command() == slurm.launch_command(c.command(True), 2) and "--resume" in job.command()
    os.remove(os.path.join(c.out_dir, "latest_step"))
    Path(c.out_dir, "latest").write_text("")
    assert job.command() == slurm.launch_command(c.command(True), 2) and "--resume" in job.command()


def test_the_job_exits_with_its_train_status_and_requeues_itself(tmp_path):
    def job(code):
        cmd = [sys.executable, "-c", code]
        return slurm.TrainJob(cmd, cmd, str(tmp_path / "latest"), str(tmp_path), {"MARK": "1"})

    assert job("import os, sys; sys.exit(os.environ['MARK'] != '1')")() == 0
    with pytest.raises(SystemExit) as e:
        job("import sys; sys.exit(3)")()
    assert e.value.code == 3
    with pytest.raises(SystemExit) as e:
        job("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")()
    assert e.value.code == 143
    again = job("pass").checkpoint()  # what submitit pickles again when it requeues the job
    assert again.function.fresh == [sys.executable, "-c", "pass"] and not again.args and not again.kwargs


@pytest.mark.slow
def test_the_torchrun_command_of_a_job_trains(tmp_path, capfd):
    """The command of a two-GPU job, run here with two CPU processes (gloo): torchrun finds the train command."""
    c = Cell(CFG, 0, "ddp", str(tmp_path / "out" / "synthetic" / "ddp"), str(tmp_path / "ddp.log"), 1,
             ["EXPERIMENT.NAME", "ddp", "SOLVER.EPOCHS", "1", "DATASET.SYNTHETIC.TRAIN_SIZE", "64",
              "DATASET.SYNTHETIC.TEST_SIZE", "32", "LOG.PREFIX", str(tmp_path / "out"), "LOG.PROGRESS", "False"])
    job = slurm.train_job(c, slurm.SlurmOptions(time="5", cpus_per_task=2, gpus_per_task=2))
    assert job.command()[2] == "torch.distributed.run" and job.env["OMP_NUM_THREADS"] == "1"
    job.cwd, job.env = str(tmp_path), {**job.env, "PYTHONPATH": str(REPO)}
    assert job() == 0
    assert c.finished()
    assert "2 process(es)" in capfd.readouterr().out


def test_sbatch_script_holds_every_option(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    opts = slurm.SlurmOptions(time="1-02:00:00", partition="gpu", cpus_per_task=8, gpus_per_task=2, mem="32G",
                              sbatch=["account=kd", "--qos=high", "exclusive"], array=True, parallel=3)
    params = slurm.sbatch_parameters(opts)
    script = _make_sbatch_string(command="CMD", folder=str(tmp_path), map_count=6, **params)
    lines = set(script.splitlines())
    for flag in ("partition=gpu", "time=1560", "cpus-per-task=8", "gpus-per-task=2", "ntasks-per-node=1",
                 "mem=32G", "account=kd", "qos=high", "exclusive", "array=0-5%3",
                 f"signal=USR2@{slurm.SIGNAL_DELAY_S}"):
        assert f"#SBATCH --{flag}" in lines, (flag, script)
    assert not any(line.startswith("#SBATCH --error") for line in lines)  # one log per job: stdout and stderr
    with pytest.raises(ConfigError, match="--time"):
        slurm.sbatch_parameters(slurm.SlurmOptions())
    for bad, match in ((dict(sbatch=["output=x"]), "--log-folder"), (dict(sbatch=["-A x"]), "KEY=VALUE"),
                       (dict(parallel=2), "--array"), (dict(mem="2 GB"), "--mem"),
                       (dict(cpus_per_task=0), "--cpus-per-task"), (dict(time="soon"), "--time")):
        with pytest.raises(ConfigError, match=match):
            slurm.SlurmOptions(**bad)


def test_states_and_no_second_submission_of_a_queued_run(tmp_path, monkeypatch):
    cells = {w: cell(tmp_path, w) for w in ("done", "queued", "running", "cancelled", "gone", "reused", "todo")}
    finish_epochs(cells["done"], 2)
    finish_epochs(cells["cancelled"], 1)
    for i, (w, c) in enumerate(cells.items()):
        if w != "todo":
            slurm.write_state(c, str(100 + i), f"study:{w}", f"/logs/{100 + i}_0_log.out")
    squeue = {"101": ("PENDING", "study:queued"), "102": ("RUNNING", "study:running"),
              "103": ("CANCELLED", "study:cancelled"), "105": ("RUNNING", "another job")}
    monkeypatch.setattr(slurm, "squeue_jobs", lambda: dict(squeue))
    rows = slurm.run_states(list(cells.values()))
    assert [r.state for r in rows] == ["done", "queued", "running", "failed", "failed", "failed", "todo"]
    assert rows[3].slurm_state == "CANCELLED" and rows[3].epochs_done == 1
    lines = slurm.status_lines(list(cells.values()))
    assert lines[0] == "study: 7 runs: 1 done, 1 running, 1 queued, 3 failed, 1 todo"
    assert any(line.startswith("failed") and "job 103 (CANCELLED)" in line and "/logs/103_0_log.out" in line
               for line in lines)

    # a rerun submits the failed and todo runs only, then waits until none is queued or running
    submitted = []

    def fake_submit(todo, opts, echo):
        submitted.extend(c.name for c in todo)
        squeue.update({"101": ("RUNNING", "study:queued")})
        for c in todo:
            finish_epochs(c, 2)

    monkeypatch.setattr(slurm, "submit", fake_submit)
    monkeypatch.setattr(slurm.time, "sleep", lambda s: squeue.clear() or finish_epochs(cells["running"], 2))
    printed = []
    with pytest.raises(UserError, match=r"1 run\(s\) did not finish: queued \(log /logs/101_0_log.out\)"):
        slurm.run_study(list(cells.values()), slurm.SlurmOptions(time="5", poll_s=0.01), echo=printed.append)
    assert submitted == ["cancelled", "gone", "reused", "todo"]
    assert any("[queued]" in p and "not submitted again" in p for p in printed)
    assert any(p.startswith("[ok]        running") for p in printed)
    assert any(p.startswith("[FAILED]    queued") for p in printed)


def test_missing_submitit_is_one_error_line(tmp_path):
    fake = tmp_path / "fake" / "submitit"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named submitit')\n")
    r = study("--executor", "slurm", "--time", "5", "--cfg", CFG, "--", "LOG.PREFIX", str(tmp_path / "out"),
              cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{REPO}"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --executor slurm needs submitit, which is not installed; install the [cluster] extra: "
        "pip install 'mdistiller_blockkd[cluster]'"]


def test_no_srun_is_one_clear_error(tmp_path, monkeypatch):
    import submitit.slurm.slurm

    monkeypatch.setattr(submitit.slurm.slurm.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="srun is not on PATH"):
        slurm.submit([cell(tmp_path)], slurm.SlurmOptions(time="5"))


def test_slurm_options_are_refused_by_the_local_executor(tmp_path):
    from mdistiller_blockkd.cli.study import main

    with pytest.raises(ConfigError, match="--partition is an option of --executor slurm"):
        main(["--cfg", CFG, "--partition", "gpu"])
    with pytest.raises(ConfigError, match="--no-wait"):
        main(["--cfg", CFG, "--no-wait"])
    with pytest.raises(ConfigError, match="needs --time"):
        main(["--executor", "slurm", "--cfg", CFG, "--", "LOG.PREFIX", str(tmp_path)])


# -- on a real Slurm (.ci/slurm_up) ------------------------------------------------------------


def slurm_absent():
    """Why Slurm cannot run the tests here, or None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm's client commands (sinfo, sbatch) are not installed; .ci/slurm_up starts a one-node cluster"
    try:
        r = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo got no answer from a Slurm controller in 20 s; start one with .ci/slurm_up"
    if r.returncode or "idle" not in r.stdout and "mix" not in r.stdout:
        why = " ".join(r.stderr.split())[:200] or f"node states {r.stdout.split()}"
        return f"no Slurm controller with an idle node answers ({why}); start one with .ci/slurm_up"
    return None


@pytest.fixture(scope="module")
def on_slurm():
    why = slurm_absent()
    if why and os.environ.get("MDKD_REQUIRE_SLURM") == "1":
        pytest.fail(f"MDKD_REQUIRE_SLURM=1 but {why}")
    if why:
        pytest.skip(why)


def tiny(prefix, epochs=2, train_size=64):
    return ["--", "DATASET.SYNTHETIC.TRAIN_SIZE", str(train_size), "DATASET.SYNTHETIC.TEST_SIZE", "32",
            "SOLVER.EPOCHS", str(epochs), "LOG.PREFIX", str(prefix), "LOG.PROGRESS", "False"]


def metrics(run_dir):
    """metrics.jsonl without its timing fields."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "ms_per_step")} for r in rows]


def state(prefix, name):
    with open(os.path.join(prefix, "synthetic", "logs", f"{name}.slurm.json")) as f:
        return json.load(f)


def wait_for(predicate, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"waited {timeout} s for {what}")


def epochs_written(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return len(Path(path).read_text().splitlines()) if os.path.isfile(path) else 0


@pytest.mark.slow
def test_slurm_study_matches_the_local_study(tmp_path, on_slurm):
    other = tmp_path / "lr01.yaml"  # the grid's second config
    cfg = yaml.safe_load(Path(CFG).read_text())
    cfg["EXPERIMENT"]["NAME"], cfg["SOLVER"]["LR"] = "vanilla_resnet8_lr01", 0.1
    other.write_text(yaml.safe_dump(cfg))
    grid = ["--cfg", CFG, str(other), "--seeds", "0", "1"]
    local, queued = tmp_path / "local", tmp_path / "slurm"
    r = study(*grid, "--jobs", "2", "--threads", "1", *tiny(local), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = study("--executor", "slurm", "--time", "10", "--poll", "0.5", *grid, *tiny(queued), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("[submitted]") == 4 and r.stdout.count("[ok]") == 4
    names = [f"{n}_s{s}" for s in (0, 1) for n in ("vanilla_resnet8", "vanilla_resnet8_lr01")]
    for name in names:
        assert metrics(queued / "synthetic" / name) == metrics(local / "synthetic" / name), name
        assert len(metrics(queued / "synthetic" / name)) == 2
        assert "Job completed successfully" in Path(state(queued, name)["log"]).read_text()
    assert metrics(queued / "synthetic" / names[0]) != metrics(queued / "synthetic" / names[1])
    # rerun: nothing to submit; --status lists them done
    r = study("--executor", "slurm", "--time", "10", *grid, *tiny(queued), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("[done]") == 4 and "[submitted]" not in r.stdout, r.stdout
    r = study("--status", *grid, *tiny(queued), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "study: 4 runs: 4 done", r.stdout


def submit_one(tmp_path, seed, epochs):
    """One run of ``epochs`` epochs (seed ``seed``) submitted without waiting: ``(study arguments, run folder,
    LOG.PREFIX, job id)``."""
    prefix = tmp_path / "out"
    args = ["--executor", "slurm", "--time", "10", "--poll", "0.5", "--cfg", CFG, "--seeds", str(seed),
            *tiny(prefix, epochs=epochs, train_size=256)]
    r = study("--no-wait", *args, cwd=tmp_path)
    assert r.returncode == 0 and "[submitted]" in r.stdout, r.stdout + r.stderr
    name = f"vanilla_resnet8_s{seed}"
    return args, prefix / "synthetic" / name, prefix, state(prefix, name)["job_id"]


@pytest.mark.slow
def test_a_cancelled_job_resumes_when_the_study_is_run_again(tmp_path, on_slurm):
    args, run_dir, prefix, job = submit_one(tmp_path, seed=2, epochs=5)
    # the same command while the job is queued or running: not submitted twice
    r = study("--no-wait", *args, cwd=tmp_path)
    assert r.returncode == 0 and "not submitted again" in r.stdout and "[submitted]" not in r.stdout, r.stdout
    wait_for(lambda: epochs_written(run_dir) >= 1, 120, "the first epoch")
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: slurm.squeue_jobs().get(job, ("gone",))[0] in slurm.ENDED | {"gone"}, 60,
             "the cancelled job to end")
    r = study("--status", *args, cwd=tmp_path)
    line = r.stdout.splitlines()[1]
    assert line.startswith("failed") and f"job {job} (CANCELLED)" in line and f"{job}_0_log.out" in line, r.stdout
    assert epochs_written(run_dir) < 5
    r = study(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[resume]" in r.stdout and "CANCELLED" in r.stdout
    assert [m["epoch"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5]
    log = Path(state(prefix, "vanilla_resnet8_s2")["log"]).read_text()
    assert "train --cfg" in log and "--resume" in log and "resumed from" in log


@pytest.mark.slow
def test_submitit_requeues_a_signalled_job_and_it_resumes(tmp_path, on_slurm):
    """SIGUSR2 (what Slurm sends before the time limit): submitit requeues the same job, which resumes the run."""
    args, run_dir, prefix, job = submit_one(tmp_path, seed=3, epochs=4)
    wait_for(lambda: epochs_written(run_dir) >= 1, 120, "the first epoch")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for(lambda: slurm.squeue_jobs().get(job, ("gone",))[0] in slurm.QUEUED, 60, "the job to be requeued")
    # Slurm holds a requeued job for two minutes (its begin time); let it start now
    subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=True)
    r = study(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[submitted]" not in r.stdout and f"job {job}" in r.stdout
    assert [m["epoch"] for m in metrics(run_dir)] == [1, 2, 3, 4]
    log = Path(state(prefix, "vanilla_resnet8_s3")["log"]).read_text()
    assert "Requeued job" in log and "--resume" in log


@pytest.mark.slow
def test_srun_with_two_tasks_trains_like_a_two_process_torchrun(tmp_path, on_slurm):
    """srun -N1 -n2 and no torchrun: each task finds its rank, the world size and the master in Slurm's
    variables (utils.dist.launch_env); the run equals a two-process torchrun run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    train = ["-m", "mdistiller_blockkd", "train", "--cfg", CFG, *tiny(tmp_path / "srun", epochs=1)[1:],
             "DATASET.TEST.BATCH_SIZE", "16", "SOLVER.BATCH_SIZE", "16"]
    r = subprocess.run(["srun", "-N1", "-n2", "--time", "10", sys.executable, *train], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 process(es)" in r.stdout and r.stdout.count("[EVAL] epoch 1/1") == 1  # rank 0 alone logs
    train[train.index(str(tmp_path / "srun"))] = str(tmp_path / "torchrun")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        *train], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    ran = [tmp_path / p / "synthetic" / "vanilla_resnet8" for p in ("srun", "torchrun")]
    assert metrics(ran[0]) == metrics(ran[1]) and len(metrics(ran[0])) == 1
