"""Block-KD and DKD inside the real torchdistill package (its YAML loader, registries,
DistillationBox and epoch hooks), on generated data; losses equal this toolbox's own."""

import copy
import importlib
import os

import pytest
import torch

torchdistill = pytest.importorskip("torchdistill")

from torchdistill.common.main_util import import_dependencies, load_ckpt  # noqa: E402
from torchdistill.common.yaml_util import load_yaml_file  # noqa: E402
from torchdistill.core.distillation import get_distillation_box  # noqa: E402
from torchdistill.models.official import get_image_classification_model  # noqa: E402
from torchdistill.models.registry import get_model  # noqa: E402

from mdistiller_blockkd.distillers import distiller_dict  # noqa: E402
from mdistiller_blockkd.config import load_cfg  # noqa: E402
from mdistiller_blockkd.errors import ConfigError  # noqa: E402

from helpers import randomize_bn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "mdistiller_blockkd", "integrations", "configs")
assert os.path.samefile(CONFIGS, importlib.import_module("mdistiller_blockkd.integrations.torchdistill").CONFIG_DIR)
CPU_YAML = os.path.join(CONFIGS, "torchdistill_blockkd_synthetic_cpu.yaml")
IMAGENET_YAML = os.path.join(CONFIGS, "torchdistill_ilsvrc2012_resnet34_resnet18_blockkd.yaml")
DEVICE = torch.device("cpu")


def load_config(path=CPU_YAML):
    """What torchdistill's example drivers do first: load the YAML, import its dependencies."""
    config = load_yaml_file(path)
    import_dependencies(config.get("dependencies"))
    return config


def load_model(model_config):
    """torchdistill's example ``load_model``: torchvision's models, else its model registry."""
    model = get_image_classification_model(model_config, False)
    if model is None:
        model = get_model(model_config["key"], model_config.get("repo_or_dir"), **model_config["kwargs"])
    load_ckpt(model_config.get("src_ckpt"), model=model, strict=True)
    return model.to(DEVICE)


def make_box(config, teacher, student):
    return get_distillation_box(teacher, student, config["datasets"], config["train"], DEVICE, None, False, 1)


def models(config, seed=0):
    torch.manual_seed(seed)
    teacher = load_model(config["models"]["teacher_model"])
    randomize_bn(teacher)
    return teacher, load_model(config["models"]["student_model"])


def test_cpu_yaml_trains_with_torchdistills_own_loop():
    config = load_config()
    teacher, student = models(config)
    t_before = copy.deepcopy(teacher.state_dict())
    s_before = copy.deepcopy(student.state_dict())
    box = make_box(config, teacher, student)
    wrapper = box.student_model
    assert type(wrapper).__name__ == "BlockKDStudent" and wrapper.num_stones == 3
    assert {k.split(".")[0] for k in wrapper.state_dict()} == {"student", "connectors", "_extra_state"}
    c_before = copy.deepcopy(wrapper.connectors.state_dict())
    term = box.criterion.term_dict["blockkd"][0]
    seen = []
    for epoch in range(box.num_epochs):  # torchdistill's train loop (examples/.../image_classification.py)
        box.pre_epoch_process(epoch=epoch)
        assert term.epoch == epoch + 1
        for sample_batch, targets, supp_dict in box.train_data_loader:
            box.pre_forward_process(sample_batch, targets, supp_dict)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss)
            assert torch.isfinite(loss)
            seen.append(float(loss.detach()))
        box.post_epoch_process()
    assert len(seen) == 4
    assert box.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)  # MultiStepLR stepped by the epoch hook
    # the student passed in (shared tensors) and the connectors trained; the teacher did not
    assert any(not torch.equal(s_before[k], v) for k, v in student.state_dict().items() if v.is_floating_point())
    assert any(not torch.equal(c_before[k], v) for k, v in wrapper.connectors.state_dict().items())
    for k, v in teacher.state_dict().items():
        assert torch.equal(t_before[k], v), k
    wrapper.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), student(x)[0])


def _ours(method, teacher, student, opts):
    cfg = load_cfg(None, [x for k, v in opts.items() for x in (k, v)] + ["DISTILLER.TYPE", method])
    return distiller_dict[method](copy.deepcopy(student), copy.deepcopy(teacher), cfg)


BLOCKKD_CASES = {
    "all-kd-epoch1": ({"stones": "all"}, {}, 0),
    "all-kd-warm": ({"stones": "all"}, {"warmup": 4}, 1),
    "sample1-dkd": ({"stones": "sample:1"}, {"logit_loss": "dkd", "dkd_beta": 2.0, "temperature": 2.0}, 0),
    "last2-lskd-unweighted-cross": ({"stones": "last:2"}, {"logit_loss": "lskd", "weight_cross": False,
                                                            "detach_ensemble": False, "gamma": 0.5}, 2),
    "every2-uniform": ({"stones": "every:2", "stone_weights": "uniform"}, {"warmup": 0}, 0),
}
_KEYS = {"stones": "BLOCKKD.STONES", "alpha": "BLOCKKD.ALPHA", "beta": "BLOCKKD.BETA", "gamma": "BLOCKKD.GAMMA",
         "temperature": "BLOCKKD.T", "warmup": "BLOCKKD.WARMUP", "logit_loss": "BLOCKKD.LOGIT_LOSS",
         "dkd_beta": "BLOCKKD.DKD_BETA", "weight_cross": "BLOCKKD.WEIGHT_CROSS",
         "detach_ensemble": "BLOCKKD.DETACH_ENSEMBLE", "stone_weights": "BLOCKKD.STONE_WEIGHTS"}


@pytest.mark.parametrize("case", sorted(BLOCKKD_CASES))
def test_blockkd_loss_through_torchdistill_equals_ours(case, capsys):
    wrapper_kw, loss_kw, epoch0 = BLOCKKD_CASES[case]
    config = load_config()
    config["train"]["student"]["auxiliary_model_wrapper"]["kwargs"].update(wrapper_kw)
    term_cfg = config["train"]["criterion"]["kwargs"]["sub_terms"]["blockkd"]["criterion"]["kwargs"]
    term_cfg.update(loss_kw)
    teacher, student = models(config, seed=1)
    opts = {_KEYS[k]: v for k, v in {**term_cfg, **wrapper_kw}.items()}
    ours = _ours("BLOCKKD", teacher, student, opts)
    box = make_box(config, teacher, student)
    box.student_model.connectors.load_state_dict(ours.connectors.state_dict())
    ours.train()
    box.pre_epoch_process(epoch=epoch0)
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for step in range(3):  # sample:K walks its deck over steps: same draws on both sides
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        torch.manual_seed(10 + step)
        want = sum(ours(image=x, target=y, epoch=epoch0 + 1)[1].values())
        torch.manual_seed(10 + step)
        got = box.forward_process(x, y, {})
        worst = max(worst, float((got - want).detach().abs()))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with capsys.disabled():
        print(f"\nBlock-KD via torchdistill {torchdistill.__version__} [{case}]: max |loss - ours| = {worst:.3g}")


@pytest.mark.parametrize("epoch0", [0, 25])
def test_dkd_loss_through_torchdistill_equals_ours(epoch0, capsys):
    config = load_config()
    train = config["train"]
    for side in ("teacher", "student"):
        train[side].pop("auxiliary_model_wrapper")
    train["criterion"] = {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"dkd": {
        "criterion": {"key": "DKDLoss", "kwargs": {"ce_weight": 1.0, "alpha": 1.0, "beta": 6.0,
                                                   "temperature": 4.0, "warmup": 20}},
        "weight": 1.0}}}}
    teacher, student = models(config, seed=2)
    # ours with the teacher's BatchNorms unfolded, as torchdistill runs it (folding moves the
    # loss by ~1e-5 relative, float rounding of an exact identity)
    ours = _ours("DKD", teacher, student, {"DKD.BETA": 6.0, "DISTILLER.FOLD_TEACHER_BN": False})
    ours.train()
    box = make_box(config, teacher, student)
    teacher.train()  # as torchdistill leaves it; the epoch hook puts the frozen teacher in eval mode
    box.pre_epoch_process(epoch=epoch0)
    assert not teacher.training
    g = torch.Generator().manual_seed(4)
    worst = 0.0
    for _ in range(3):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        want = sum(ours(image=x, target=y, epoch=epoch0 + 1)[1].values())
        got = box.forward_process(x, y, {})
        worst = max(worst, float((got - want).detach().abs()))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with capsys.disabled():
        print(f"\nDKD via torchdistill {torchdistill.__version__} [epoch {epoch0 + 1}]: max |loss - ours| = {worst:.3g}")


def test_misconfigurations_are_one_line_config_errors():
    from mdistiller_blockkd.integrations import torchdistill as td

    config = load_config()
    teacher, student = models(config)
    with pytest.raises(ConfigError, match="found no BlockKDTeacher with that link"):
        td.BlockKDStudent(student, DEVICE, None, False, link="nowhere")
    with pytest.raises(ConfigError, match=r"unknown kwargs \['stone'\]"):
        td.BlockKDStudent(student, DEVICE, None, False, stone="all")
    teacher_side = td.BlockKDTeacher(teacher, DEVICE, link="x")  # torchdistill's box keeps it alive
    with pytest.raises(ConfigError, match="BLOCKKD.STONES is 'some'"):
        td.BlockKDStudent(student, DEVICE, None, False, link="x", stones="some")
    del teacher_side
    with pytest.raises(ConfigError, match="found no BlockKDTeacher with that link"):  # links are weak
        td.BlockKDStudent(student, DEVICE, None, False, link="x")
    loss = td.BlockKDLoss(warmup=5)
    out = td.BlockKDOutput(torch.zeros(2, 10), [torch.zeros(2, 10)], torch.tensor([[1.0, 1.0, 1.0]]))
    with pytest.raises(ConfigError, match="never given the epoch; set train.pre_epoch_process"):
        loss({".": {"output": out}}, {".": {"output": torch.zeros(2, 10)}}, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="from the BlockKDStudent auxiliary wrapper"):
        td.BlockKDLoss(warmup=0)({".": {"output": torch.zeros(2, 10)}}, {".": {"output": torch.zeros(2, 10)}},
                                 torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="logit_loss is 'l2'"):
        td.BlockKDLoss(logit_loss="l2")


def test_ddp_needs_find_unused_parameters_with_sampled_stones(tmp_path):
    """torchdistill turns DDP's find_unused_parameters on only for frozen student parameters; with
    sample:K / every:K the skipped connectors would fail DDP at the second step: one clear error instead."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mdistiller_blockkd.integrations import torchdistill as td

    config = load_config()
    teacher, student = models(config)
    teacher_side = td.BlockKDTeacher(teacher, DEVICE, link="ddp")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    def two_steps(stones, find_unused_parameters):
        wrapper = td.BlockKDStudent(copy.deepcopy(student), DEVICE, None, True, link="ddp", stones=stones).train()
        # what torchdistill's wrap_model builds for train.student.wrapper: 'DistributedDataParallel'
        ddp = DistributedDataParallel(wrapper, device_ids=None, find_unused_parameters=find_unused_parameters)
        for _ in range(2):
            out = ddp(x)
            td.BlockKDLoss(warmup=0)({".": {"output": out}}, {".": {"output": teacher_side(x)}}, y).backward()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for stones in ("sample:1", "every:2"):
            with pytest.raises(ConfigError, match=r"stones '(sample:1|every:2)' .* set train.student.wrapper: "
                                                  r"\{key: 'DistributedDataParallel', kwargs: "
                                                  r"\{find_unused_parameters: True\}\} in the YAML"):
                two_steps(stones, False)
            two_steps(stones, True)
        two_steps("all", False)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": float("nan")}, "temperature is nan"), ({"temperature": float("inf")}, "temperature is inf"),
    ({"warmup": float("nan")}, "warmup is nan"), ({"warmup": float("inf")}, "warmup is inf"),
    ({"temperature": "abc"}, "temperature is 'abc'"), ({"temperature": 0}, "temperature is 0; it must be a finite number > 0"),
    ({"beta": -1.0}, "beta is -1.0; it must be a finite number >= 0"),
])
def test_losses_refuse_non_finite_or_negative_numbers(kwargs, match):
    from mdistiller_blockkd.integrations import torchdistill as td

    for loss in (td.BlockKDLoss, td.DKDLoss):
        with pytest.raises(ConfigError, match=f"{loss.__name__} {match}"):
            loss(**kwargs)


def test_other_class_counts_are_one_config_error():
    from mdistiller_blockkd.integrations import torchdistill as td

    config = load_config()
    config["models"]["student_model"]["kwargs"]["num_classes"] = 5
    teacher, student = models(config)
    with pytest.raises(ConfigError, match="BlockKDStudent: the student classifies 5 classes but the teacher 10"):
        make_box(config, teacher, student)
    with pytest.raises(ConfigError, match="DKDLoss: the student gives 5 class scores but the teacher 10"):
        td.DKDLoss(warmup=0)({".": {"output": torch.zeros(2, 5)}}, {".": {"output": torch.zeros(2, 10)}},
                             torch.tensor([0, 1]))
    out = td.BlockKDOutput(torch.zeros(2, 5), [torch.zeros(2, 10)], torch.tensor([[1.0, 1.0, 1.0]]))
    with pytest.raises(ConfigError, match="BlockKDLoss: the student gives 5 class scores but the teacher 10"):
        td.BlockKDLoss(warmup=0)({".": {"output": out}}, {".": {"output": torch.zeros(2, 10)}}, torch.tensor([0, 1]))


def test_imagenet_yaml_names_torchvision_resnets_and_the_integration(tmp_path):
    from PIL import Image

    for split in ("train", "val"):  # a one-image ImageFolder tree stands in for ILSVRC 2012
        (tmp_path / split / "n01440764").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "n01440764" / "x.png")
    text = open(IMAGENET_YAML).read()
    assert text.count("'~/datasets/ilsvrc2012'") == 1
    (tmp_path / "c.yaml").write_text(text.replace("'~/datasets/ilsvrc2012'", repr(str(tmp_path))))
    config = load_yaml_file(str(tmp_path / "c.yaml"))
    assert len(config["datasets"]["ilsvrc2012/train"]) == 1
    assert config["dependencies"] == [{"name": "mdistiller_blockkd.integrations.torchdistill"}]
    t, s = config["models"]["teacher_model"], config["models"]["student_model"]
    assert (t["key"], s["key"]) == ("resnet34", "resnet18")
    assert str(t["kwargs"]["weights"]) == "ResNet34_Weights.IMAGENET1K_V1" and s["kwargs"]["weights"] is None
    train = config["train"]
    assert train["pre_epoch_process"] == "blockkd_pre_epoch_process"
    assert train["teacher"]["auxiliary_model_wrapper"]["key"] == "BlockKDTeacher"
    assert train["student"]["auxiliary_model_wrapper"]["key"] == "BlockKDStudent"
    crit = train["criterion"]["kwargs"]["sub_terms"]["blockkd"]["criterion"]
    assert crit["key"] == "BlockKDLoss" and crit["kwargs"]["temperature"] == 1.0 and crit["kwargs"]["warmup"] == 1
    # the torchvision models it names are adapted: randomly initialised ones, built offline
    import_dependencies(config["dependencies"])
    from mdistiller_blockkd.integrations import torchdistill as td

    tv_t = get_image_classification_model({"key": "resnet34", "kwargs": {"num_classes": 10}})
    tv_s = get_image_classification_model({"key": "resnet18", "kwargs": {"num_classes": 10}})
    teacher_side = td.BlockKDTeacher(tv_t, DEVICE, link="tv")
    w = td.BlockKDStudent(tv_s, DEVICE, None, False, link="tv")
    assert w.teacher is teacher_side.teacher and "teacher" not in dict(w.named_children())
    assert w.num_stones == 4 and w.student.timm_name == "resnet18"
    w.train()
    out = w(torch.randn(2, 3, 64, 64))
    assert len(out.stones) == 4
    sum(z.sum() for z in out.stones).backward()
    assert tv_s.layer1[0].conv1.weight.grad is not None  # the torchvision student itself is trained
