"""Launching on several nodes (mdistiller_blockkd.utils.dist.launch_env): torchrun's variables, an srun
step's (rank, world size, local rank, master from the node list), and a two-node torchrun on localhost
(two torchrun processes, c10d rendezvous, gloo) that trains like one two-process torchrun.

The real srun launch is in tests/test_slurm.py (it needs the CI Slurm).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mdistiller_blockkd.errors import ConfigError
from mdistiller_blockkd.utils import dist as du

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "synthetic" / "vanilla_resnet8.yaml")
TINY = ["DATASET.SYNTHETIC.TRAIN_SIZE", "64", "DATASET.SYNTHETIC.TEST_SIZE", "40", "SOLVER.BATCH_SIZE", "16",
        "DATASET.TEST.BATCH_SIZE", "16", "SOLVER.EPOCHS", "1", "LOG.PROGRESS", "False"]
SRUN = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-09]"}


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[1-3,5]", ["gpu1", "gpu2", "gpu3", "gpu5"]),
    ("gpu[08-10],cpu7", ["gpu08", "gpu09", "gpu10", "cpu7"]),
    ("r[1-2]-n[3-4]", ["r1-n3", "r1-n4", "r2-n3", "r2-n4"]),
    ("a-b.c[9]", ["a-b.c9"]),
])
def test_slurm_node_lists_expand(nodelist, hosts):
    assert du.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[1-", "gpu[a-b]", "", "x,,y"])
def test_an_unreadable_node_list_is_one_clear_error(bad):
    with pytest.raises(ConfigError, match="set MASTER_ADDR"):
        du.expand_nodelist(bad)


def test_torchrun_variables_win():
    env = {**SRUN, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0"}
    assert du.launch_env(env) == du.LaunchEnv(1, 2, 0, "torchrun", None)  # env://: torch reads MASTER_*
    assert du.launch_env({}) == du.LaunchEnv(0, 1, 0, "none", None)


def test_an_srun_step_gives_rank_world_local_rank_and_master(monkeypatch):
    monkeypatch.setattr(du.shutil, "which", lambda name: None)  # no scontrol: the own parser
    launch = du.launch_env(SRUN)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (3, 4, 1, "srun")
    host, port = launch.init_method[len("tcp://"):].rsplit(":", 1)
    assert host == "gpu07" and 20000 <= int(port) < 30000  # the step's first node
    assert du.launch_env(SRUN).init_method == launch.init_method  # every task of the step agrees
    assert du.launch_env({**SRUN, "SLURM_JOB_ID": "4243"}).init_method != launch.init_method
    no_step = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"}
    assert du.launch_env(no_step).init_method.startswith("tcp://gpu07:")
    assert du.launch_env({**SRUN, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400"}).init_method == \
        "tcp://10.0.0.5:29400"
    assert du.launch_env({**SRUN, "MASTER_ADDR": "fe80::1", "MASTER_PORT": "29400"}).init_method == \
        "tcp://[fe80::1]:29400"
    # one task: nothing to meet; a batch script (no step) is one process whatever its --ntasks
    assert du.launch_env({**SRUN, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).init_method is None
    batch = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert du.launch_env(batch) == du.LaunchEnv(0, 1, 0, "none", None)


def test_scontrol_expands_the_node_list_when_it_answers(monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="gpu07\ngpu08\n", stderr="")

    monkeypatch.setattr(du.shutil, "which", lambda name: "/usr/bin/scontrol")
    monkeypatch.setattr(du.subprocess, "run", fake_run)
    assert du.launch_env(SRUN).init_method.startswith("tcp://gpu07:")
    assert calls == [["scontrol", "show", "hostnames", "gpu[07-08]"]]
    # scontrol failing (no slurm.conf here): the own parser
    monkeypatch.setattr(du.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "fatal"))
    assert du.launch_env(SRUN).init_method.startswith("tcp://gpu07:")


@pytest.mark.parametrize("env, needle", [
    ({**SRUN, "SLURM_PROCID": "x"}, "SLURM_PROCID is 'x'; it must be an integer (set by srun)"),
    ({**SRUN, "MASTER_PORT": "70000"}, "MASTER_PORT is 70000"),
    ({k: v for k, v in SRUN.items() if "NODELIST" not in k}, "without a node list"),
])
def test_bad_srun_variables_are_one_clear_error(env, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        du.launch_env(env)


# -- two nodes on localhost ------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "ms_per_step")} for r in rows]


def env():
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in list(e):
        if k.startswith("SLURM_") or k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            del e[k]
    return e


def train(prefix, *launcher):
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "mdistiller_blockkd", "train",
            "--cfg", SMOKE, "LOG.PREFIX", str(prefix), *TINY]


@pytest.mark.slow
def test_two_node_torchrun_with_c10d_trains_like_one_node(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(train(tmp_path / "two_nodes", "--nnodes", "2", "--node-rank", str(rank),
                                    "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                                    "--rdzv-id", "mdkd-test"),
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    assert sum("2 process(es)" in out for out in outs) == 1  # rank 0 logs; it counted both nodes' processes
    r = subprocess.run(train(tmp_path / "one_node", "--standalone", "--nproc-per-node", "2"), env=env(),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    two, one = (tmp_path / p / "synthetic" / "vanilla_resnet8" for p in ("two_nodes", "one_node"))
    assert metrics(two) == metrics(one) and len(metrics(two)) == 1
