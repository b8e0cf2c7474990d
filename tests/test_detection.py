"""Detection: COCO-format data, the canvas builder, torchvision Faster R-CNN distillers, COCO mAP, trainer runs."""

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from mdistiller_blockkd.detection.data import CocoDetection, build_detection_datasets, collate
from mdistiller_blockkd.detection.distillers import DetBlockKD, det_distiller_dict
from mdistiller_blockkd.detection.evaluate import METRICS, coco_metrics
from mdistiller_blockkd.detection.make_canvas import make_detection_set
from mdistiller_blockkd.detection.models import build_detector, load_detector_weights, stage_channels
from mdistiller_blockkd.detection.task import build_detection_distiller, build_detection_run
from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.utils.checkpoint import load_checkpoint, save_checkpoint
from mdistiller_blockkd.engine.trainer import Trainer, experiment_name
from mdistiller_blockkd.errors import CheckpointError, ConfigError, DatasetError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["DETECTION.MIN_SIZE", "64", "DETECTION.MAX_SIZE", "64", "DETECTION.REPRESENTATION_SIZE", "32",
        "DETECTION.FPN_CHANNELS", "32",
        "DETECTION.RPN_PRE_NMS_TOP_N_TRAIN", "50", "DETECTION.RPN_PRE_NMS_TOP_N_TEST", "50",
        "DETECTION.RPN_POST_NMS_TOP_N_TRAIN", "20", "DETECTION.RPN_POST_NMS_TOP_N_TEST", "20",
        "DETECTION.RPN_BATCH_SIZE_PER_IMAGE", "32", "DETECTION.BOX_BATCH_SIZE_PER_IMAGE", "16",
        "DETECTION.DETECTIONS_PER_IMAGE", "10"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    """A tiny real-image COCO-format set (embedded Fashion-MNIST items on 64x64 canvases)."""
    root = str(tmp_path_factory.mktemp("det"))
    make_detection_set(root, n_train=8, n_val=4, size=64, seed=0, source="embedded", max_objects=2,
                       min_scale=16, max_scale=32)
    return root


def det_cfg(root, prefix, *opts):
    base = ["DATASET.TYPE", "coco", "DATASET.ROOT", root, "DATASET.NUM_WORKERS", "0", "DATASET.TEST.BATCH_SIZE", "4",
            "DISTILLER.STUDENT", "fasterrcnn_resnet18_fpn", "DISTILLER.TEACHER", "fasterrcnn_resnet18_fpn",
            "SOLVER.BATCH_SIZE", "4", "SOLVER.EPOCHS", "1", "SOLVER.LR", "0.01", "SOLVER.LR_DECAY_STAGES", "[5]",
            "LOG.PREFIX", str(prefix), "LOG.PROGRESS", "False", "LOG.SAVE_CHECKPOINT_FREQ", "0",
            "EXPERIMENT.PROJECT", "p", "EXPERIMENT.NAME", "run"]
    return load_cfg(None, base + TINY + list(opts))


def write_coco(root, images, anns, cats=None, split="train2017", make_files=True):
    """A hand-written COCO file (and blank PNGs) for the bad-input tests."""
    from PIL import Image

    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    for im in images:
        if make_files:
            Image.new("RGB", (im["width"], im["height"])).save(os.path.join(root, split, im["file_name"]))
    cats = cats if cats is not None else [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)


def img(i, w=40, h=30):
    return {"id": i, "file_name": f"{i}.png", "width": w, "height": h}


def ann(i, image_id, bbox, cat=1, **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0, **kw}


# -- the canvas builder ---------------------------------------------------------------------
def test_canvas_builder_is_deterministic_and_boxes_are_inside(tmp_path, coco_root):
    other = str(tmp_path / "again")
    make_detection_set(other, n_train=8, n_val=4, size=64, seed=0, source="embedded", max_objects=2,
                       min_scale=16, max_scale=32)
    for split in ("train2017", "val2017"):
        a = json.load(open(os.path.join(coco_root, "annotations", f"instances_{split}.json")))
        b = json.load(open(os.path.join(other, "annotations", f"instances_{split}.json")))
        assert a["annotations"] == b["annotations"] and a["images"] == b["images"]
        for x in a["annotations"]:
            bx, by, bw, bh = x["bbox"]
            assert bw > 0 and bh > 0 and bx >= 0 and by >= 0 and bx + bw <= 64 and by + bh <= 64
            assert 1 <= x["category_id"] <= 10
        assert len(a["categories"]) == 10
        with open(os.path.join(coco_root, split, a["images"][0]["file_name"]), "rb") as f1, \
                open(os.path.join(other, split, a["images"][0]["file_name"]), "rb") as f2:
            assert f1.read() == f2.read()
    ds = CocoDetection(coco_root, "train2017")
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and target["boxes"].shape[1] == 4 and target["labels"].min() >= 1


# -- bad inputs -----------------------------------------------------------------------------
def test_missing_root_and_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        CocoDetection(str(tmp_path / "nowhere"), "train2017")
    os.makedirs(tmp_path / "r" / "train2017")
    with pytest.raises(DatasetError, match=r"instances_train2017\.json.*not found"):
        CocoDetection(str(tmp_path / "r"), "train2017")


def test_box_outside_is_clipped_with_a_warning_or_an_error(tmp_path):
    root = str(tmp_path)
    write_coco(root, [img(1)], [ann(1, 1, [30, 20, 20, 20]), ann(2, 1, [-5, 0, 10, 10])])
    with pytest.warns(UserWarning, match="2 box"):
        ds = CocoDetection(root, "train2017")
    assert ds[0][1]["boxes"].tolist() == [[30.0, 20.0, 40.0, 30.0], [0.0, 0.0, 5.0, 10.0]]
    with pytest.raises(DatasetError, match="reaches outside"):
        CocoDetection(root, "train2017", box_outside="error")


def test_degenerate_boxes_dropped_and_images_without_boxes_kept(tmp_path):
    root = str(tmp_path)
    write_coco(root, [img(1), img(2), img(3)], [ann(1, 1, [5, 5, 0, 10]), ann(2, 1, [50, 5, 5, 5]),
                                                 ann(3, 2, [1, 1, 10, 10], cat=2)])
    with pytest.warns(UserWarning, match="2 box"):
        ds = CocoDetection(root, "train2017")
    assert len(ds) == 3 and ds.stats["empty_images"] == 2 and ds.stats["dropped"] == 2
    _, t = ds[0]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    assert ds[1][1]["labels"].tolist() == [2]


def test_unknown_category_and_missing_image_are_errors(tmp_path):
    write_coco(str(tmp_path / "a"), [img(1)], [ann(1, 1, [1, 1, 5, 5], cat=7)])
    with pytest.raises(DatasetError, match="category_id 7"):
        CocoDetection(str(tmp_path / "a"), "train2017")
    write_coco(str(tmp_path / "b"), [img(1)], [], make_files=False)
    with pytest.raises(DatasetError, match=r"1\.png.*not found"):
        CocoDetection(str(tmp_path / "b"), "train2017")


@pytest.mark.parametrize("field,value,match", [
    ("bbox", "1,1,5,5", r"annotation 1 has bbox '1,1,5,5'; expected \[x, y, width, height\], four finite numbers"),
    ("bbox", [1, float("nan"), 5, 5], r"annotation 1 has bbox \[1, nan, 5, 5\]"),
    ("bbox", [1, 1, 5], r"annotation 1 has bbox \[1, 1, 5\]"),
    ("bbox", ["1", "1", "5", "5"], "four finite numbers"),
    ("bbox", None, "annotation 1 has bbox None"),
    ("category_id", "1", "annotation 1 has 'category_id' '1'; it must be a whole number"),
    ("image_id", [1], r"annotation 1 has 'image_id' \[1\]; it must be a whole number"),
    ("iscrowd", "yes", "annotation 1 has iscrowd 'yes'; use 0 or 1"),
    ("image.width", "40", "image 1 has 'width' '40'; it must be a whole number >= 1"),
    ("image.height", 0, "image 1 has 'height' 0; it must be a whole number >= 1"),
    ("image.file_name", 3, "image 1 has 'file_name' 3; it must be a text value"),
    ("image.id", 1.5, "an entry of 'images' has 'id' 1.5"),
    ("categories", [{"name": "a"}], "an entry of 'categories' has 'id' missing"),
    ("categories", [{"id": 1}, {"id": 1}], "category id 1 is listed twice"),
    ("categories", ["a"], "an entry of 'categories' is 'a', not an object"),
    ("annotations", [5], "an entry of 'annotations' is 5, not an object"),
])
def test_malformed_coco_fields_are_one_dataset_error_naming_file_and_field(tmp_path, field, value, match):
    root = str(tmp_path)
    write_coco(root, [img(1)], [ann(1, 1, [1, 1, 5, 5])])
    path = os.path.join(root, "annotations", "instances_train2017.json")
    data = json.load(open(path))
    if field.startswith("image."):
        data["images"][0][field[len("image."):]] = value
    elif field in ("categories", "annotations"):
        data[field] = value
    else:
        data["annotations"][0][field] = value
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(DatasetError, match=f"'{re.escape(path)}': .*{match}"):
        CocoDetection(root, "train2017")


def test_teacher_with_other_categories_is_an_error(tmp_path, coco_root):
    cfg = det_cfg(coco_root, tmp_path)
    other = build_detector("fasterrcnn_resnet18_fpn", 5, cfg.DETECTION)
    path = str(tmp_path / "t.pth")
    save_checkpoint({"model": other.state_dict()}, path)
    cfg = det_cfg(coco_root, tmp_path, "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER_CKPT", path)
    with pytest.raises(ConfigError, match="classifies 5 classes.*dataset has 11"):
        build_detection_run(cfg)


def test_missing_teacher_file_names_torchvision_file(tmp_path, coco_root):
    cfg = det_cfg(coco_root, tmp_path, "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "fasterrcnn_resnet50_fpn",
                  "DISTILLER.TEACHER_CKPT", str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match=r"missing\.pth.*fasterrcnn_resnet50_fpn_coco-258fb6c6\.pth"):
        build_detection_run(cfg)
    cfg = det_cfg(coco_root, tmp_path, "DISTILLER.TYPE", "REVIEWKD")
    with pytest.raises(ConfigError, match="not available for detection"):
        build_detection_run(cfg)


def test_cli_prints_one_error_line_for_a_missing_annotation_file(tmp_path):
    os.makedirs(tmp_path / "d")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--cfg",
                        os.path.join(ROOT, "configs", "detection", "fmnist_det", "vanilla.yaml"),
                        "DATASET.ROOT", str(tmp_path / "d"), "LOG.PREFIX", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})  # this checkout's package
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: annotation file") and "instances_train2017.json" in lines[0]


# -- models ---------------------------------------------------------------------------------
def test_detector_keys_are_torchvisions(tmp_path):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    cfg = load_cfg(None, ["DETECTION.REPRESENTATION_SIZE", "1024"])
    ours = build_detector("fasterrcnn_resnet50_fpn", 91, cfg.DETECTION, norm="frozen_bn").state_dict()
    ref = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    # without weights torchvision builds BatchNorm2d; its COCO file (FrozenBatchNorm2d) has no num_batches_tracked
    ref = {k: v for k, v in ref.items() if not k.endswith("num_batches_tracked")}
    assert list(ours) == list(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    # a file laid out like torchvision's COCO weights (bare state dict, FrozenBN, old RPN-head names) loads offline
    old = {k.replace("rpn.head.conv.0.0.", "rpn.head.conv."): v for k, v in ref.items()}
    path = os.path.join(str(tmp_path), "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth")
    torch.save(old, path)
    teacher = build_detector("fasterrcnn_resnet50_fpn", 91, cfg.DETECTION, norm="frozen_bn")
    load_detector_weights(teacher, path, "fasterrcnn_resnet50_fpn", 91)
    assert torch.equal(teacher.rpn.head.conv[0][0].weight, ref["rpn.head.conv.0.0.weight"])
    with pytest.raises(ConfigError, match="unknown"):
        build_detector("fasterrcnn_vgg16_fpn", 3, cfg.DETECTION)


def test_bn_trained_weights_load_into_frozen_bn_teacher(tmp_path):
    cfg = load_cfg(None, TINY)
    student = build_detector("fasterrcnn_resnet18_fpn", 3, cfg.DETECTION, norm="bn")
    path = str(tmp_path / "s.pth")
    save_checkpoint({"model": student.state_dict()}, path)
    teacher = build_detector("fasterrcnn_resnet18_fpn", 3, cfg.DETECTION, norm="frozen_bn")
    load_detector_weights(teacher, path, "fasterrcnn_resnet18_fpn", 3)
    assert torch.equal(teacher.backbone.body.layer1[0].conv1.weight, student.backbone.body.layer1[0].conv1.weight)
    assert torch.equal(teacher.backbone.body.bn1.running_var, student.backbone.body.bn1.running_var)
    old = {k.replace("rpn.head.conv.0.0.", "rpn.head.conv."): v for k, v in student.state_dict().items()}
    save_checkpoint(old, path)  # a bare state dict with torchvision's old RPN-head names (its COCO file)
    load_detector_weights(teacher, path, "fasterrcnn_resnet18_fpn", 3)
    other = build_detector("fasterrcnn_resnet34_fpn", 3, cfg.DETECTION, norm="frozen_bn")
    with pytest.raises(CheckpointError, match="does not fit detector"):
        load_detector_weights(other, path, "fasterrcnn_resnet34_fpn", 3)


# -- COCO mAP -------------------------------------------------------------------------------
def test_coco_metrics_known_answers(coco_root):
    ann_file = os.path.join(coco_root, "annotations", "instances_val2017.json")
    gt = json.load(open(ann_file))["annotations"]
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0} for a in gt]
    m = coco_metrics(ann_file, perfect)
    assert list(m) == list(METRICS)
    assert m["AP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0) and m["AP75"] == pytest.approx(100.0)
    assert m["APl"] == -1.0  # no ground-truth box larger than 96^2 px on a 64 px canvas
    wrong = [dict(d, category_id=d["category_id"] % 10 + 1) for d in perfect]
    assert coco_metrics(ann_file, wrong)["AP"] == pytest.approx(0.0)
    assert coco_metrics(ann_file, []) == {k: 0.0 for k in METRICS}
    shifted = [dict(d, bbox=[d["bbox"][0] + d["bbox"][2] * 0.3, d["bbox"][1], d["bbox"][2], d["bbox"][3]]) for d in perfect]
    s = coco_metrics(ann_file, shifted)  # IoU ~0.54: a hit at IoU 0.5, a miss at 0.75
    assert s["AP50"] == pytest.approx(100.0) and s["AP75"] == pytest.approx(0.0)


# -- distillers -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_file(coco_root, tmp_path_factory):
    cfg = det_cfg(coco_root, "unused")
    torch.manual_seed(0)
    t = build_detector("fasterrcnn_resnet34_fpn", 11, cfg.DETECTION, norm="bn")
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    save_checkpoint({"model": t.state_dict()}, path)
    return path


@pytest.mark.parametrize("kind", ["NONE", "KD", "DKD", "BLOCKKD"])
def test_one_training_step_each_distiller(kind, coco_root, teacher_file, tmp_path):
    cfg = det_cfg(coco_root, tmp_path, "DISTILLER.TYPE", kind, "DISTILLER.TEACHER", "fasterrcnn_resnet34_fpn",
                  "DISTILLER.TEACHER_CKPT", teacher_file, "DETECTION.DISTILL_WARMUP_STEPS", "2")
    train_set, _, n = build_detection_datasets(cfg)
    torch.manual_seed(0)
    d = build_detection_distiller(cfg, n)
    assert isinstance(d, det_distiller_dict[kind])
    d.train()
    images, targets = collate([train_set[i] for i in range(3)])
    before = {k: v.clone() for k, v in d.teacher.state_dict().items()} if d.teacher is not None else {}
    opt = torch.optim.SGD(d.get_learnable_parameters(), lr=0.01)
    (logits, labels), losses = d(image=images, target=targets, epoch=1)
    assert logits.shape == (labels.numel(), 11)
    expect = {"loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    expect |= {"NONE": {"loss_classifier"}, "KD": {"loss_classifier", "loss_kd"}, "DKD": {"loss_classifier", "loss_kd"},
               "BLOCKKD": {"loss_ce", "loss_kd", "loss_cross"}}[kind]
    assert set(losses) == expect
    total = sum(losses.values())
    assert torch.isfinite(total)
    if kind in ("KD", "BLOCKKD"):
        assert float(losses["loss_kd"].detach()) > 0  # random teacher: logits differ
    if kind == "DKD":  # warm-up by steps: 1 of 2 steps done
        assert d.warm(1, 0) == pytest.approx(0.5)
    opt.zero_grad()
    total.backward()
    opt.step()
    assert d.student.backbone.body.conv1.weight.grad is not None
    if d.teacher is not None:
        assert all(p.grad is None for p in d.teacher.parameters())
        assert all(torch.equal(v, before[k]) for k, v in d.teacher.state_dict().items())
        assert not any(n.startswith("teacher.") for n, _ in d.named_parameters() if any(p is _ for p in d.get_learnable_parameters()))
    if kind == "BLOCKKD":
        assert all(c.proj[0].weight.grad is not None for c in d.connectors)
        assert "stone4" in d.describe()


@pytest.mark.parametrize("kind", ["DKD", "BLOCKKD"])
def test_step_warmup_never_reads_the_device(kind, coco_root, teacher_file, tmp_path):
    """The warm-up's step count is a Python int: reading the buffer would sync the host with the GPU each step."""

    class Watched(torch.Tensor):
        reads = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.item, torch.Tensor.__float__,
                        torch.Tensor.tolist, torch.Tensor.__bool__):
                cls.reads.append(func.__name__)
            return super().__torch_function__(func, types, args, kwargs or {})

    cfg = det_cfg(coco_root, tmp_path, "DISTILLER.TYPE", kind, "DISTILLER.TEACHER", "fasterrcnn_resnet34_fpn",
                  "DISTILLER.TEACHER_CKPT", teacher_file, "DETECTION.DISTILL_WARMUP_STEPS", "4")
    train_set, _, n = build_detection_datasets(cfg)
    torch.manual_seed(0)
    d = build_detection_distiller(cfg, n).train()
    d._buffers["num_steps"] = d.num_steps.as_subclass(Watched)
    images, targets = collate([train_set[i] for i in range(2)])
    for _ in range(2):
        d(image=images, target=targets, epoch=1)
    assert Watched.reads == []
    assert d.warm(1, 0) == pytest.approx(0.5)
    e = build_detection_distiller(cfg, n)  # the count survives a checkpoint
    e.load_state_dict(d.state_dict())
    assert e.warm(1, 0) == pytest.approx(0.5) and int(e.num_steps) == 2


def test_blockkd_last_stone_with_identity_connectors_equals_teacher(coco_root, teacher_file, tmp_path):
    """Splicing check: the teacher's own body through identity connectors gives the teacher's logits."""
    cfg = det_cfg(coco_root, tmp_path, "DISTILLER.TYPE", "BLOCKKD", "DISTILLER.TEACHER", "fasterrcnn_resnet34_fpn",
                  "DISTILLER.TEACHER_CKPT", teacher_file)
    train_set, _, n = build_detection_datasets(cfg)
    d = build_detection_distiller(cfg, n)
    assert stage_channels(d.teacher) == [64, 128, 256, 512]
    d.train()
    images, targets = collate([train_set[i] for i in range(2)])
    step = d.student_step(images, targets)
    t_body = d.teacher.backbone.body(step.images.tensors)
    step.body = list(t_body.values())  # feed the teacher's own stages into the stones
    for c in d.connectors:
        conv, bn = c.proj[0], c.proj[1]
        with torch.no_grad():
            conv.weight.copy_(torch.eye(conv.weight.shape[0]).view_as(conv.weight))
        bn.eval()  # running stats 0 / 1: identity up to eps
        bn.eps = 0.0
    with torch.no_grad():
        stones = d.stone_logits(step, [0, 1, 2, 3])
        t_logits = d.teacher_logits(step)
    for z in stones:
        assert torch.allclose(z, t_logits, atol=1e-4)


# -- the trainer ----------------------------------------------------------------------------
def test_training_run_metrics_resume_and_export(coco_root, teacher_file, tmp_path, capsys):
    def run(epochs, resume=False):
        cfg = det_cfg(coco_root, tmp_path, "DISTILLER.TYPE", "BLOCKKD", "DISTILLER.TEACHER", "fasterrcnn_resnet34_fpn",
                      "DISTILLER.TEACHER_CKPT", teacher_file, "SOLVER.EPOCHS", str(epochs), "BLOCKKD.STONES", "sample:2")
        torch.manual_seed(0)
        tl, vl, d, task, _ = build_detection_run(cfg)
        tr = Trainer(experiment_name(cfg), d, tl, vl, cfg, log=lambda *a: None, task=task)
        return tr.train(resume=resume), tr

    summary, _ = run(1)
    out = summary["log_path"]
    rec = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rec) == 1 and all(f"test_{k}" in rec[0] for k in METRICS)
    assert rec[0]["best_acc"] == rec[0]["test_AP"] and {"loss_ce", "loss_kd", "loss_cross", "loss_box_reg"} <= set(rec[0])
    summary2, tr = run(2, resume=True)
    rec = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rec] == [1, 2]
    assert tr.start_epoch == 2 and int(tr.distiller.num_steps) == 2 * (8 // 4)
    sd = load_checkpoint(os.path.join(out, "student_best"))["model"]
    cfg = det_cfg(coco_root, tmp_path)
    fresh = build_detector("fasterrcnn_resnet18_fpn", 11, cfg.DETECTION)
    assert list(sd) == list(fresh.state_dict())
    fresh.load_state_dict(sd)
    state = load_checkpoint(os.path.join(out, "latest"))["model"]  # training state: connectors yes, teacher no
    assert any(k.startswith("connectors.") for k in state) and not any(k.startswith("teacher.") for k in state)
    # the report command ranks detection runs by AP and tables the six metrics; plots test_AP per epoch
    from mdistiller_blockkd.cli import report
    assert report.main([out, "--plots", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "COCO box mAP" in text and "| AP | AP50 | AP75 | APs | APm | APl |" in text
    assert f"{rec[-1]['test_APl']:.2f}" in text.split("COCO box mAP")[1]
    assert os.path.getsize(tmp_path / "plots" / "test_acc.png") > 0


def test_benchmark_times_detection_configs(capsys):
    from mdistiller_blockkd.cli import benchmark as bench
    cfgs = [os.path.join(ROOT, "configs", "detection", "fmnist_det", f"{m}.yaml") for m in ("kd", "blockkd")]
    assert bench.main(["--cfg", *cfgs, "--batch-size", "2", "--image-size", "64", "--num-classes", "11",
                       "--warmup", "1", "--steps", "1", "--memory", "off",
                       *[f"{k}={v}" for k, v in zip(TINY[::2], TINY[1::2])]]) == 0
    out = capsys.readouterr().out
    assert "BLOCKKD" in out and "fasterrcnn_resnet34_fpn" in out and "1.00" in out


@pytest.mark.slow
def test_two_process_gloo_detection_run(coco_root, teacher_file, tmp_path):
    """torchrun, 2 CPU processes, KD: DDP training, and COCO metrics equal to a one-process evaluation."""
    from mdistiller_blockkd.detection.evaluate import evaluate_detector

    opts = ["DATASET.TYPE", "coco", "DATASET.ROOT", coco_root, "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER",
            "fasterrcnn_resnet34_fpn", "DISTILLER.TEACHER_CKPT", teacher_file, "SOLVER.BATCH_SIZE", "2",
            "SOLVER.EPOCHS", "1", "DATASET.TEST.BATCH_SIZE", "1", "LOG.PREFIX", str(tmp_path),
            "EXPERIMENT.NAME", "ddp", "LOG.PROGRESS", "False", *TINY]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "tools", "train.py"), "--cfg",
                        os.path.join(ROOT, "configs", "detection", "fmnist_det", "vanilla.yaml"), *opts],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    folder = os.path.join(str(tmp_path), "fmnist_det", "ddp")
    (row,) = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    assert load_checkpoint(os.path.join(folder, "latest"))["world_size"] == 2
    cfg = det_cfg(coco_root, tmp_path, "DATASET.TEST.BATCH_SIZE", "1")
    _, val_set, n = build_detection_datasets(cfg)
    model = build_detector("fasterrcnn_resnet18_fpn", n, cfg.DETECTION)
    model.load_state_dict(load_checkpoint(os.path.join(folder, "student_latest"))["model"])
    model.eval()
    loader = torch.utils.data.DataLoader(val_set, batch_size=1, collate_fn=collate)
    m = evaluate_detector(model, loader, val_set, "cpu")
    assert m["AP"] == pytest.approx(row["test_AP"]) and m["AP50"] == pytest.approx(row["test_AP50"])


def test_blockkd_stone_options_follow_classification_blockkd(coco_root, teacher_file, tmp_path):
    cfg = det_cfg(coco_root, tmp_path, "DISTILLER.TYPE", "BLOCKKD", "DISTILLER.TEACHER", "fasterrcnn_resnet34_fpn",
                  "DISTILLER.TEACHER_CKPT", teacher_file, "BLOCKKD.STONES", "last:1")
    train_set, _, n = build_detection_datasets(cfg)
    d = build_detection_distiller(cfg, n)
    assert d.stone_ids == [4] and d.stone_weights == [1.0] and "stone4" in d.describe() and "stone3" not in d.describe()
    d.train()
    _, losses = d(image=[train_set[0][0]], target=[train_set[0][1]], epoch=1)
    sum(losses.values()).backward()
    assert all(c.proj[0].weight.grad is not None for c in d.connectors)  # stone 4 uses every level's connector
    bad = det_cfg(coco_root, tmp_path, "DISTILLER.TYPE", "BLOCKKD", "DISTILLER.TEACHER", "fasterrcnn_resnet34_fpn",
                  "DISTILLER.TEACHER_CKPT", teacher_file, "BLOCKKD.PAIRS", "[[1, 1]]")
    with pytest.raises(ConfigError, match="PAIRS is not used for detection"):
        build_detection_distiller(bad, n)


def test_blockkd_stones_keeping_less_give_the_same_gradients(coco_root, teacher_file, tmp_path):
    """BLOCKKD.SAVE_MASKS and BLOCKKD.RECOMPUTE on the detection stones (teacher stages, FPN, ROI head): same loss,
    same gradients as stones that keep every activation."""
    results = []
    for keep in (["BLOCKKD.SAVE_MASKS", "False"], ["BLOCKKD.SAVE_MASKS", "True"], ["BLOCKKD.RECOMPUTE", "True"]):
        cfg = det_cfg(coco_root, tmp_path, "DISTILLER.TYPE", "BLOCKKD", "DISTILLER.TEACHER", "fasterrcnn_resnet34_fpn",
                      "DISTILLER.TEACHER_CKPT", teacher_file, *keep)
        train_set, _, n = build_detection_datasets(cfg)
        torch.manual_seed(0)
        d = build_detection_distiller(cfg, n).train()
        _, losses = d(image=[train_set[0][0]], target=[train_set[0][1]], epoch=1)
        loss = sum(losses.values())
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in d.named_parameters() if p.grad is not None}))
    (want, want_grads), rest = results[0], results[1:]
    assert any(k.startswith("connectors.") for k in want_grads)
    for got, grads in rest:
        torch.testing.assert_close(got, want)
        assert set(grads) == set(want_grads)
        for k in want_grads:
            torch.testing.assert_close(grads[k], want_grads[k], msg=k)


def test_missing_pycocotools_is_one_clear_error(monkeypatch):
    import sys

    from mdistiller_blockkd.detection import evaluate
    from mdistiller_blockkd.errors import UserError

    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(UserError, match=r"pip install 'mdistiller_blockkd\[detection\]'"):
        evaluate.require_pycocotools()
