"""GPU-only paths checked on the CPU: deterministic kernels, the bf16 warning, CPU checkpoints,
one visible GPU per process. CUDA is faked (patched queries, fake CUDA tensors); nothing runs on a GPU."""

import os
from collections import OrderedDict

import pytest
import torch

from mdistiller_blockkd.engine import trainer as trainer_mod
from mdistiller_blockkd.errors import ConfigError
from mdistiller_blockkd.utils import dist as du
from mdistiller_blockkd.utils import misc
from mdistiller_blockkd.utils.checkpoint import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- EXPERIMENT.DETERMINISTIC ----------------------------------------------------------------
@pytest.fixture
def torch_flags(monkeypatch):
    """Record use_deterministic_algorithms; restore the cuDNN flags and CUBLAS_WORKSPACE_CONFIG after."""
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, warn_only=False: calls.append((on, warn_only)))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", torch.backends.cudnn.deterministic)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    return calls


def test_deterministic_turns_on_deterministic_kernels(torch_flags):
    misc.set_deterministic(True)
    assert torch_flags == [(True, True)]  # warn_only: an op without a deterministic kernel warns, naming itself
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    misc.set_deterministic(False)
    assert torch_flags[-1] == (False, True)
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark


def test_a_users_cublas_setting_is_kept(torch_flags, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    misc.set_deterministic(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_train_command_sets_determinism_before_cuda_starts(tmp_path, monkeypatch):
    from mdistiller_blockkd.cli import train

    order = []

    class Stop(Exception):
        pass

    def init_distributed():
        order.append("init_distributed")
        raise Stop

    monkeypatch.setattr(misc, "set_deterministic", lambda on: order.append(("set_deterministic", on)))
    monkeypatch.setattr(du, "init_distributed", init_distributed)
    with pytest.raises(Stop):
        train.main(["--cfg", os.path.join(ROOT, "configs", "synthetic", "vanilla_resnet8.yaml"),
                    "EXPERIMENT.DETERMINISTIC", "True", "LOG.PREFIX", str(tmp_path)])
    assert order == [("set_deterministic", True), "init_distributed"]


def test_trainer_applies_the_flag(tmp_path, monkeypatch):
    from test_trainer import make_cfg, make_trainer

    seen = []
    monkeypatch.setattr(trainer_mod, "set_deterministic", seen.append)
    make_trainer(make_cfg(tmp_path, "EXPERIMENT.DETERMINISTIC", "True"))
    make_trainer(make_cfg(tmp_path))  # off on the CPU: torch's global flags are left alone
    assert seen == [True]


# -- bf16 on GPUs without it -----------------------------------------------------------------
@pytest.mark.parametrize("capability, warns", [((7, 0), True), ((7, 5), True), ((8, 0), False), ((9, 0), False)])
def test_bf16_on_a_gpu_without_native_bf16_warns(monkeypatch, capability, warns):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    note = trainer_mod._bf16_note("bf16", torch.device("cuda", 0))
    if warns:
        assert note.startswith("SOLVER.AMP bf16 on Tesla V100-SXM2-16GB (compute capability 7.")
        assert note.endswith("use SOLVER.AMP fp16 on it")
    else:
        assert note is None
    assert trainer_mod._bf16_note("fp16", torch.device("cuda", 0)) is None
    assert trainer_mod._bf16_note("bf16", torch.device("cpu")) is None


# -- checkpoints -----------------------------------------------------------------------------
def test_checkpoints_hold_cpu_tensors_only(tmp_path, monkeypatch):
    """A training state taken on a GPU (fake CUDA tensors) is written with CPU tensors only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    written = []
    monkeypatch.setattr(torch, "save", lambda obj, f: written.append(obj))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = OrderedDict(w=torch.zeros(3, device="cuda"), b=torch.zeros(3))
        model._metadata = OrderedDict({"": {"version": 1}})
        state = {"epoch": 2, "model": model,
                 "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3, device="cuda")}},
                               "param_groups": [{"lr": 0.1, "params": [0]}]},
                 "rng": [{"torch": torch.zeros(5, dtype=torch.uint8), "cuda": torch.zeros(8, device="cuda")}],
                 "best_acc": 1.5, "pair": ("a", 1)}
        assert state["model"]["w"].is_cuda
        save_checkpoint(state, str(tmp_path / "latest"))
    (obj,) = written

    def tensors(o):
        if isinstance(o, torch.Tensor):
            return [o]
        if isinstance(o, dict):
            o = list(o.values())
        return [t for v in o for t in tensors(v)] if isinstance(o, (list, tuple)) else []

    assert len(tensors(obj)) == 5 and all(t.device.type == "cpu" for t in tensors(obj))
    assert obj["epoch"] == 2 and obj["best_acc"] == 1.5 and obj["pair"] == ("a", 1)
    assert obj["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert isinstance(obj["model"], OrderedDict) and obj["model"]._metadata == {"": {"version": 1}}


# -- one GPU per process -----------------------------------------------------------------------
@pytest.fixture
def gpus(monkeypatch):
    """``set(n)``: CUDA with n visible devices (queries patched; the device made current is recorded)."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES", "SLURM_STEP_ID", "SLURM_PROCID",
              "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)

    def set_count(n):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        return current

    return set_count


def test_one_visible_gpu_per_process_is_used_whatever_the_local_rank(gpus, monkeypatch):
    """Slurm --gpus-per-task=1: every task sees its own GPU as cuda:0, LOCAL_RANK counts the tasks."""
    current = gpus(1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    info = du.init_distributed()  # WORLD_SIZE 1: no process group
    assert info.device == torch.device("cuda", 0) and info.local_rank == 3
    assert current == [torch.device("cuda", 0)]


def test_an_srun_task_with_one_gpu_uses_cuda_0(gpus, monkeypatch):
    """srun --gpus-per-task=1 without torchrun: the local rank comes from SLURM_LOCALID, the device is cuda:0."""
    current = gpus(1)
    for k, v in {"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "2",
                 "CUDA_VISIBLE_DEVICES": "2"}.items():
        monkeypatch.setenv(k, v)
    info = du.init_distributed()
    assert info.device == torch.device("cuda", 0) and info.local_rank == 2 and current == [torch.device("cuda", 0)]
    gpus(4)  # every GPU visible: SLURM_LOCALID picks one
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert du.init_distributed().device == torch.device("cuda", 2)


def test_local_rank_picks_its_gpu_among_several(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert du.init_distributed().device == torch.device("cuda", 2)


@pytest.mark.parametrize("count, visible", [(2, None), (1, None), (2, "0,1")])
def test_more_processes_than_gpus_is_a_clear_error(gpus, monkeypatch, count, visible):
    gpus(count)
    monkeypatch.setenv("LOCAL_RANK", "3")
    if visible:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(ConfigError, match=rf"LOCAL_RANK is 3 but only {count} CUDA device\(s\) are visible; use "
                                          rf"--nproc_per_node {count} or fewer, or give each process its own GPU"):
        du.init_distributed()


# -- tools/gpu_check.sh ----------------------------------------------------------------------
def test_gpu_check_script_parses_and_stops_clearly_without_cuda(tmp_path):
    import re
    import subprocess
    import sys

    script = os.path.join(ROOT, "tools", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    snippets = re.findall(r"<<'PY'[^\n]*\n(.*?)\nPY\n", text, re.S)
    assert len(snippets) == text.count("<<'PY'") == 5
    for code in snippets:
        compile(code, script, "exec")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run")
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gpu_check needs a CUDA GPU"), lines
    assert open(tmp_path / "log").read().strip() == lines[0]
