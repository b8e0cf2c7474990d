"""Distillers under ``nn.DataParallel``, with replica 1 on the ``meta`` device.

``TwoDevices`` runs DataParallel's own forward (scatter, ``torch.nn.parallel.replicate``,
parallel threads, gather) without a GPU: replica 0 lives on the CPU and replica 1 on the
meta device, which holds no data. Any tensor of replica 0 (or of the module itself) that
replica 1's forward touches raises "Tensor on device cpu is not on the expected device
meta", the CPU picture of replica 1 feeding its cuda:1 chunk into cuda:0 weights. Only
the placement is faked: ``replicate``'s broadcast puts replica 1's parameters and buffers
on meta, ``Scatter`` sends it the second chunk of the batch.
"""

import copy
import importlib
import threading

import pytest
import torch
from torch import nn

from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.distillers import base, distiller_dict
from mdistiller_blockkd.models import build_model, fold

from helpers import randomize_bn

_replicate_mod = importlib.import_module("torch.nn.parallel.replicate")
_scatter_gather = importlib.import_module("torch.nn.parallel.scatter_gather")
META = torch.device("meta")


class TwoDevices(nn.DataParallel):
    """``nn.DataParallel`` over two devices (``devices``: replica 0's, replica 1's), without CUDA.

    ``forward`` is DataParallel's; its ``parallel_apply`` runs the replicas in threads as
    torch's does (without CUDA streams) and its ``gather`` keeps every replica's output
    in ``self.outputs`` and returns replica 0's (tensors on meta cannot be gathered).
    """

    def __init__(self, module, devices=("cpu", "meta")):
        super().__init__(module)  # no CUDA: keeps the module, no device ids
        self.devices = [torch.device(d) for d in devices]
        self.device_ids, self.output_device, self.src_device_obj, self.dim = [0, 1], 0, torch.device("cpu"), 0
        self.outputs = None

    def parallel_apply(self, replicas, inputs, kwargs):
        results = [None] * len(replicas)
        grad = torch.is_grad_enabled()

        def work(i):
            torch.set_grad_enabled(grad)
            try:
                results[i] = replicas[i](*inputs[i], **kwargs[i])
            except Exception as e:  # re-raised below, as torch's ExceptionWrapper does
                results[i] = e

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(replicas))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def gather(self, outputs, output_device):
        self.outputs = outputs
        return outputs[0]


@pytest.fixture
def two_devices(monkeypatch):
    """``TwoDevices(module, devices)``, with ``replicate`` and ``Scatter`` placing data on those devices."""
    placed = {}

    def broadcast(tensors, device_ids, detach=False):
        out = []
        for j in device_ids:
            dev = placed["devices"][j]
            if dev.type == "cpu":  # like Broadcast: copies stay in the autograd graph of what requires grad
                out.append([t.detach().clone() if detach or not t.requires_grad else t.clone() for t in tensors])
            else:
                out.append([t.detach().to(dev).requires_grad_(t.requires_grad and not detach) for t in tensors])
        return out

    class Scatter:
        @staticmethod
        def apply(target_gpus, chunk_sizes, dim, obj):
            return tuple(c.to(placed["devices"][i]) for i, c in enumerate(obj.chunk(len(target_gpus), dim)))

    monkeypatch.setattr(_replicate_mod, "_broadcast_coalesced_reshape", broadcast)
    monkeypatch.setattr(_replicate_mod, "_get_device_index", lambda d, optional=False: int(d))
    monkeypatch.setattr(_scatter_gather, "Scatter", Scatter)

    def make(module, devices=("cpu", "meta")):
        dp = TwoDevices(module, devices)
        placed["devices"] = dp.devices
        return dp

    return make


@pytest.fixture
def fold_on_meta(monkeypatch):
    """BN folding's check compares numbers, which the meta device has not: there it passes."""
    real = fold._difference
    monkeypatch.setattr(fold, "_difference", lambda ref, outs: 0.0 if ref[0].is_meta else real(ref, outs))


@pytest.fixture
def fold_counter(monkeypatch):
    calls = []
    real = base.try_fold_frozen_bn

    def counting(model, probe, *a, **k):
        calls.append(probe.device)
        return real(model, probe, *a, **k)

    monkeypatch.setattr(base, "try_fold_frozen_bn", counting)
    return calls


def make(stones="sample:1", teacher="resnet20", student="resnet8", **opts):
    torch.manual_seed(0)
    cfg = load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD", "BLOCKKD.WARMUP", 0, "BLOCKKD.STONES", stones]
                   + [x for kv in opts.items() for x in kv])
    t = build_model(teacher, num_classes=10)
    randomize_bn(t)
    return distiller_dict["BLOCKKD"](build_model(student, num_classes=10), t, cfg)


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10


def tensors_of(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors_of(o)]
    return []


def check_devices(dp):
    """Replica 0's outputs are on the CPU, replica 1's on meta."""
    (out0, out1) = dp.outputs
    assert tensors_of(out0) and all(t.device.type == "cpu" for t in tensors_of(out0))
    assert tensors_of(out1) and all(t.is_meta for t in tensors_of(out1))


def folds_used(d):
    """``(device type, folded)`` of every teacher executor the distiller built."""
    return sorted((k[0].type, v is not None and v is not d.teacher) for k, v in d._shared.teacher_exec.items())


# -- the toolbox's BLOCKKD (mdistiller's tools/train.py always wraps it in DataParallel) --
@pytest.mark.parametrize("stones", ["all", "sample:1"])
def test_blockkd_replica_on_meta_runs_its_own_student_and_folded_teacher(two_devices, fold_on_meta, stones):
    d = make(stones, **{"DISTILLER.FOLD_TEACHER_BN": True}).train()
    dp = two_devices(d)
    x, y = batch()
    for _ in range(2):
        logits, losses = dp(image=x, target=y, epoch=1)
        check_devices(dp)
        assert logits.shape == (2, 10) and set(losses) == {"loss_ce", "loss_kd", "loss_cross"}
        sum(losses.values()).backward()  # replica 0's graph reaches the module's own parameters
    # each device's replica folded its own teacher once (the cache is keyed by device)
    assert folds_used(d) == [("cpu", True), ("meta", True)]
    assert d.teacher_folded is True
    assert d.student.get_classifier().weight.grad is not None
    assert any(p.grad is not None for p in d.connectors.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())
    # replica 0 computes what the module computes on its chunk
    d.eval()
    dp.eval()
    with torch.no_grad():
        torch.testing.assert_close(dp(image=x), d(image=x[:2]))
    check_devices(dp)


@pytest.mark.parametrize("keep", [{"BLOCKKD.RECOMPUTE": True}, {"BLOCKKD.SAVE_MASKS": True}], ids=["recompute", "masks"])
def test_stones_keeping_less_run_on_a_meta_replica(two_devices, fold_on_meta, keep):
    """The recomputed (checkpointed) and the masked stone passes run in each replica's thread, on its device."""
    d = make("all", **keep).train()
    dp = two_devices(d)
    x, y = batch()
    _, losses = dp(image=x, target=y, epoch=1)
    check_devices(dp)
    sum(losses.values()).backward()
    _, want = make("all", **{"BLOCKKD.SAVE_MASKS": False}).train()(image=x[:2], target=y[:2], epoch=1)
    for k in want:
        torch.testing.assert_close(losses[k], want[k])
    assert all(p.grad is not None for p in d.connectors.parameters())


def test_replicas_compute_the_same_losses_as_the_module(two_devices):
    d = make("all").train()
    x, y = batch()
    dp = two_devices(d, ("cpu", "cpu"))
    _, got = dp(image=x, target=y, epoch=1)
    _, want = d(image=x[:2], target=y[:2], epoch=1)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_folded_teacher_is_built_once_per_device_and_after_load_state_dict(two_devices, fold_on_meta, fold_counter):
    d = make("all").train()
    dp = two_devices(d)
    x, y = batch()
    dp(image=x, target=y, epoch=1)
    dp(image=x, target=y, epoch=1)
    assert sorted(dev.type for dev in fold_counter) == ["cpu", "meta"]
    d.load_state_dict(d.state_dict())
    assert d.teacher_folded is None
    dp(image=x, target=y, epoch=1)
    assert len(fold_counter) == 4


def test_fold_probe_hooks_stay_on_the_copy():
    """Folding a replica's teacher must not hook its modules: replicas share their hook tables,
    so the other replicas' forwards, running meanwhile, would call the probe's hooks."""

    class Watched(dict):
        def __setitem__(self, key, value):
            self.writes.append(key)
            super().__setitem__(key, value)

    m = build_model("resnet8", num_classes=10).eval()
    randomize_bn(m)
    for mod in m.modules():
        mod._forward_hooks = Watched(mod._forward_hooks)
        mod._forward_hooks.writes = []
    assert fold.fold_frozen_bn(m, torch.randn(2, 3, 32, 32)) is not None
    assert not [name for name, mod in m.named_modules() if mod._forward_hooks.writes]


# -- the mdistiller plugin, with the stand-in's own models --------------------------------
def test_plugin_replica_on_meta(two_devices, fold_on_meta, fake_mdistiller):
    from mdistiller_blockkd import plugin

    cls = plugin.register()
    from mdistiller.engine.cfg import CFG
    from mdistiller.models import cifar_model_dict

    torch.manual_seed(0)
    up_t, up_s = cifar_model_dict["resnet20"](num_classes=10), cifar_model_dict["resnet8"](num_classes=10)
    randomize_bn(up_t)
    CFG.merge_from_list(["BLOCKKD.WARMUP", 0])
    d = cls(up_s, up_t, CFG).train()
    dp = two_devices(d)
    x, y = batch()
    logits, losses = dp(image=x, target=y, epoch=1)  # mdistiller's trainer call
    check_devices(dp)
    sum(v.mean() for v in losses.values()).backward()
    assert folds_used(d) == [("cpu", True), ("meta", True)]
    d.eval()
    dp.eval()
    with torch.no_grad():
        assert dp(image=x).shape == (2, 10)  # mdistiller's validate() call
    check_devices(dp)


# -- torchdistill's BlockKDStudent / BlockKDTeacher ------------------------------------------
def _torchdistill_pair(stones, link):
    td = pytest.importorskip("mdistiller_blockkd.integrations.torchdistill")
    torch.manual_seed(0)
    t = build_model("resnet20", num_classes=10)
    randomize_bn(t)
    teacher_side = td.BlockKDTeacher(t, torch.device("cpu"), link=link)
    student_side = td.BlockKDStudent(build_model("resnet8", num_classes=10), torch.device("cpu"), None, False,
                                     link=link, stones=stones)
    return td, teacher_side, student_side


def test_blockkdstudent_replica_on_meta(two_devices, fold_on_meta):
    td, teacher_side, student_side = _torchdistill_pair("all", "dp-meta")
    student_side.train()
    x, _ = batch()
    t_dp, s_dp = two_devices(teacher_side), two_devices(student_side)
    with torch.no_grad():
        t_dp(x)
    check_devices(t_dp)
    out = s_dp(x)
    check_devices(s_dp)
    assert isinstance(out, td.BlockKDOutput) and len(out.stones) == 3
    assert folds_used(student_side) == [("cpu", True), ("meta", True)]
    sum(z.sum() for z in out.stones).backward()
    assert any(p.grad is not None for p in student_side.connectors.parameters())
    assert all(p.grad is None for p in student_side.teacher.parameters())


@pytest.mark.parametrize("stones", ["all", "sample:1", "every:2"])
def test_blockkdstudent_outputs_gather(two_devices, monkeypatch, stones):
    """torch's gather (DataParallel's, and torchdistill's I/O dict) of the replicas' BlockKDOutput."""
    td, _, student_side = _torchdistill_pair(stones, f"gather-{stones}")
    student_side.train()

    class Gather:  # torch's Gather on CPU tensors: concatenate (scalars: unsqueeze first)
        @staticmethod
        def apply(target_device, dim, *inputs):
            return torch.cat([t.unsqueeze(0) if t.dim() == 0 else t for t in inputs], dim)

    monkeypatch.setattr(_scatter_gather, "Gather", Gather)
    dp = two_devices(student_side, ("cpu", "cpu"))
    x, y = batch()
    for _ in range(2):
        dp(x)
        out = _scatter_gather.gather(dp.outputs, 0)
        assert isinstance(out, td.BlockKDOutput) and out.logits.shape == (4, 10)
        assert all(z.shape == (4, 10) for z in out.stones)
        assert out.plan.shape == (2, 2 + len(out.stones)) and torch.equal(out.plan[0], out.plan[1])
        loss = td.BlockKDLoss(warmup=0)({".": {"output": out}}, {".": {"output": torch.randn(4, 10)}}, y)
        assert torch.isfinite(loss)
        loss.backward()


# -- the draw state: once per step, shared by the replicas of the step ------------------------
@pytest.mark.parametrize("stones", ["sample:1", "every:2"])
def test_replicas_of_a_step_share_its_draw(two_devices, monkeypatch, stones):
    d = make(stones).train()
    used = []
    real = type(d)._stone_logits

    def recording(self, outs, active, tview):
        used.append(tuple(active))
        return real(self, outs, active, tview)

    monkeypatch.setattr(type(d), "_stone_logits", recording)
    dp = two_devices(d, ("cpu", "cpu"))
    x, y = batch()
    for _ in range(4):
        dp(image=x, target=y, epoch=1)
    per_step = [used[i: i + 2] for i in range(0, len(used), 2)]
    assert all(a == b for a, b in per_step), per_step  # both replicas of a step ran the same stones
    state = d.get_extra_state()
    if stones == "every:2":  # one step in two has the stones, as on one device
        assert [len(a) for a, _ in per_step] == [3, 0, 3, 0] and state["step"] == 4
    else:  # the walk advanced once per step: every stone once in 3 steps
        assert state["pos"] == 4 % 3 and sorted(a[0] for a, _ in per_step[:3]) == [0, 1, 2]
    # the state survives a checkpoint, and a deep copy is an independent holder
    e = make(stones)
    e.load_state_dict(d.state_dict())
    assert e.get_extra_state() == state
    f = copy.deepcopy(d)
    two_devices(f, ("cpu", "cpu"))(image=x, target=y, epoch=1)
    assert d.get_extra_state() == state and f.get_extra_state() != state


def test_timm_replica_on_meta_runs_its_own_head(two_devices):
    m = build_model("timm:resnet18", num_classes=5).eval()
    dp = two_devices(m)
    with torch.no_grad():
        logits, _ = dp(torch.randn(4, 3, 64, 64))
    assert logits.shape == (2, 5)
    assert dp.outputs[1][0].is_meta
