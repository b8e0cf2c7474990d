"""Distillers under DataParallel: replicas made at every step share the folded teacher and
the ``sample:K`` walk (DataParallel's replicate step emulated on CPU)."""

import copy
import importlib
import threading

import pytest
import torch

from mdistiller_blockkd.distillers import base, distiller_dict
from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.models import build_model

from helpers import randomize_bn

_replicate_mod = importlib.import_module("torch.nn.parallel.replicate")


@pytest.fixture
def cpu_replicate(monkeypatch):
    """``torch.nn.parallel.replicate`` on CPU: each device's broadcast copy is a clone (kept in the
    autograd graph for tensors that require grad, as ``Broadcast`` does)."""

    def broadcast(tensors, devices, detach=False):
        return [[t.detach().clone() if detach or not t.requires_grad else t.clone() for t in tensors]
                for _ in devices]

    monkeypatch.setattr(_replicate_mod, "_broadcast_coalesced_reshape", broadcast)
    monkeypatch.setattr(_replicate_mod, "_get_device_index", lambda d, optional=False: int(d))
    return lambda module, n: _replicate_mod.replicate(module, list(range(n)))


@pytest.fixture
def fold_counter(monkeypatch):
    calls = []
    real = base.fold_frozen_bn

    def counting(model, probe, *a, **k):
        calls.append(model)
        return real(model, probe, *a, **k)

    monkeypatch.setattr(base, "fold_frozen_bn", counting)
    return calls


def make(stones="sample:1", teacher="resnet20", student="resnet8"):
    torch.manual_seed(0)
    cfg = load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD", "BLOCKKD.WARMUP", 0, "BLOCKKD.STONES", stones])
    t = build_model(teacher, num_classes=10)
    randomize_bn(t)
    return distiller_dict["BLOCKKD"](build_model(student, num_classes=10), t, cfg)


def dp_step(replicate, d, x, y, n=2):
    """One DataParallel-style step: replicate, run the replicas in parallel threads on chunks, sum."""
    replicas = replicate(d, n)
    outs = [None] * n
    errors = []

    def run(i, r, xi, yi):
        try:
            outs[i] = r(image=xi, target=yi, epoch=1)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, r, xi, yi))
               for i, (r, xi, yi) in enumerate(zip(replicas, x.chunk(n), y.chunk(n)))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return sum(sum(v for v in losses.values()) for _, losses in outs)


def test_replicas_fold_the_teacher_once_and_advance_the_shared_walk(cpu_replicate, fold_counter):
    d = make("sample:1")
    d.train()
    n = d.num_stones
    assert n == 3
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    seen, positions = [], []
    for step in range(3):
        before = list(d._deck) if d._pos else None
        loss = dp_step(cpu_replicate, d, x, y)
        loss.backward()
        positions.append(d.get_extra_state()["pos"])
        seen.append((before, d.get_extra_state()["deck"]))
    # one fold for the (device, dtype) both replicas run on, not one per replica and step
    assert len(fold_counter) == 1
    # every replica drew one stone from the module's own walk: 2 draws per step
    assert positions == [2 % n, 4 % n, 6 % n]
    assert sorted(d.get_extra_state()["deck"]) == list(range(n))
    # gradients reach the module's own student and connector parameters through the replicas
    assert all(p.grad is not None for p in d.connectors.parameters())
    assert d.student.get_classifier().weight.grad is not None
    assert all(p.grad is None for p in d.teacher.parameters())


def test_walk_survives_state_dict_round_trip_after_replicated_steps(cpu_replicate):
    d = make("sample:1")
    d.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    dp_step(cpu_replicate, d, x, y, n=2)
    dp_step(cpu_replicate, d, x, y, n=1)
    state = d.get_extra_state()
    assert state["pos"] == 3 % d.num_stones
    e = make("sample:1")
    e.load_state_dict(d.state_dict())
    assert e.get_extra_state() == state
    # the copies are independent holders: advancing one leaves the other alone
    f = copy.deepcopy(d)
    dp_step(cpu_replicate, f, x, y, n=1)
    assert d.get_extra_state() == state and f.get_extra_state() != state


def test_folded_teacher_is_rebuilt_after_load_state_dict(cpu_replicate, fold_counter):
    d = make("all")
    d.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    dp_step(cpu_replicate, d, x, y)
    d.load_state_dict(d.state_dict())
    dp_step(cpu_replicate, d, x, y)
    assert len(fold_counter) == 2


def test_replicas_compute_the_same_losses_as_the_module(cpu_replicate):
    d = make("all")
    d.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    (r,) = cpu_replicate(d, 1)
    _, ref = d(image=x, target=y, epoch=1)
    _, got = r(image=x, target=y, epoch=1)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def test_timm_replica_runs_its_own_head(cpu_replicate):
    m = build_model("timm:resnet18", num_classes=5).eval()
    (r,) = cpu_replicate(m, 1)
    r.fc.weight = torch.zeros_like(m.fc.weight)  # the replica's own copy, not the module's
    with torch.no_grad():
        logits, _ = r(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(logits, m.fc.bias.detach().expand(2, 5))
    assert r.get_classifier() is r.fc and m.get_classifier() is m.fc


def test_every_k_step_count_advances_through_replicas(cpu_replicate):
    d = make("every:2")
    d.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        dp_step(cpu_replicate, d, x, y)
    assert d.get_extra_state()["step"] == 4  # 2 replica forwards per step, counted on the module
