"""The text task end to end: hf: models on GLUE / tsv data through the train command.

Tiny random BERTs saved locally (test_hf_models.save_bert), GLUE files written in GLUE's own
layout; every run is a few steps on one thread.
"""

import json
import math
import os

import pytest
import torch
import yaml

from mdistiller_blockkd.cli import train
from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.engine.build import check_distiller_config
from mdistiller_blockkd.errors import ConfigError
from mdistiller_blockkd.models import build_model
from mdistiller_blockkd.models.hf_encoder import load_tokenizer
from mdistiller_blockkd.utils.checkpoint import load_checkpoint
from mdistiller_blockkd.utils.text_batch import pack_text_batch

from test_errors import one_error
from test_hf_models import WORDS, save_bert

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

POS, NEG = ["good", "very good", "good good"], ["bad", "very bad", "bad bad"]
NOUNS = ["the movie", "a film", "the cat", "the dog"]
#: keys of a record that differ between two runs of the same recipe (wall-clock timing)
TIMING = ("epoch_time_s", "ms_per_step")


def sentences(n, offset=0):
    """``n`` (sentence, label) pairs: label 1 when the sentence praises, 0 when it pans."""
    out = []
    for i in range(offset, offset + n):
        label = i % 2
        words = (POS if label else NEG)[(i // 2) % 3]
        out.append((f"{NOUNS[(i // 6) % 4]} was {words}", label))
    return out


def write_lines(folder, name, lines):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_sst2(root):
    """GLUE's SST-2 layout: a header, then ``sentence<TAB>label`` (GLUE's sentences end with a space)."""
    for name, rows in (("train.tsv", sentences(32)), ("dev.tsv", sentences(12, offset=32))):
        write_lines(os.path.join(root, "SST-2"), name, ["sentence\tlabel"] + [f"{s} \t{y}" for s, y in rows])
    return str(root)


def write_cola(root):
    """GLUE's CoLA layout: no header; source, label, original mark, sentence."""
    for name, rows in (("train.tsv", sentences(32)), ("dev.tsv", sentences(12, offset=32))):
        write_lines(os.path.join(root, "CoLA"), name,
                    [f"gj04\t{y}\t{'' if y else '*'}\t{s}" for s, y in rows])


def write_mrpc(root):
    """GLUE's MRPC layout: Quality, #1 ID, #2 ID, #1 String, #2 String."""
    for name, rows in (("train.tsv", sentences(32)), ("dev.tsv", sentences(12, offset=32))):
        lines = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        lines += [f"{y}\t{100 + i}\t{200 + i}\t{s}\t{NOUNS[i % 4]} is {'good' if y else 'bad'}"
                  for i, (s, y) in enumerate(rows)]
        write_lines(os.path.join(root, "MRPC"), name, lines)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Two BERT folders (teacher: 4 layers, hidden 32; student: 2 layers, hidden 24), GLUE data, and a
    teacher fine-tuned by the train command (DISTILLER.TYPE NONE with the teacher as student)."""
    root = tmp_path_factory.mktemp("text")
    glue = write_sst2(root / "glue_data")
    write_cola(root / "glue_data")
    write_mrpc(root / "glue_data")
    env = {"teacher": save_bert(root / "teacher", 4, 32), "student": save_bert(root / "student", 2, 24, seed=1),
           "glue": glue, "root": root}
    cfg = root / "text.yaml"
    cfg.write_text(yaml.safe_dump({
        "EXPERIMENT": {"PROJECT": "text", "NAME": "run"},
        "DATASET": {"TYPE": "glue", "ROOT": glue, "GLUE": {"TASK": "sst2"}, "NUM_WORKERS": 0,
                    "TEXT": {"MAX_LENGTH": 16}, "TEST": {"BATCH_SIZE": 8}},
        "DISTILLER": {"TYPE": "BLOCKKD", "TEACHER": f"hf:{env['teacher']}", "STUDENT": f"hf:{env['student']}",
                      "TEACHER_CKPT": str(root / "out" / "text" / "teacher" / "student_best")},
        "BLOCKKD": {"CONNECTOR": "linear_ln", "WARMUP": 0},
        "SOLVER": {"TYPE": "AdamW", "LR": 1.0e-3, "WEIGHT_DECAY": 0.01, "BATCH_SIZE": 8, "EPOCHS": 1,
                   "CLIP_GRAD_NORM": 1.0},
        "LOG": {"PREFIX": str(root / "out"), "PROGRESS": False, "TENSORBOARD_FREQ": 0, "EVAL_HEADS_FREQ": 1},
    }))
    env["cfg"] = str(cfg)
    train.main(["--cfg", env["cfg"], "--brief", "DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT", f"hf:{env['teacher']}",
                "EXPERIMENT.NAME", "teacher", "SOLVER.LR", "5.0e-3", "SOLVER.EPOCHS", "8"])
    env["teacher_run"] = records(root / "out" / "text" / "teacher")
    return env


def run(env, name, *opts):
    train.main(["--cfg", env["cfg"], "--brief", "EXPERIMENT.NAME", name, *opts])
    return os.path.join(env["root"], "out", "text", name)


def records(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def untimed(record):
    return {k: v for k, v in record.items() if k not in TIMING}


def test_blockkd_on_glue_sst2_trains_scores_stones_and_resumes_exactly(text):
    full = run(text, "full", "SOLVER.EPOCHS", "2")
    recs = records(full)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:  # GLUE's metric of SST-2 (accuracy), every stone, the teacher; no top-5 of two classes
        assert {"test_acc", "test_loss", "acc_stone1", "acc_stone2", "acc_teacher", "loss_kd", "loss_cross"} <= set(r)
        assert "test_acc_top5" not in r and all(0 <= r[k] <= 100 for k in r if k.startswith("acc_"))
    # the teacher is the fine-tuned one of DISTILLER.TEACHER_CKPT (its student_best), frozen: same test accuracy
    teacher_acc = text["teacher_run"][-1]["best_acc"]
    assert teacher_acc > 90 and all(r["acc_teacher"] == pytest.approx(teacher_acc) for r in recs)
    assert recs[-1]["best_acc"] == max(r["test_acc"] for r in recs)

    split = run(text, "split")  # one epoch, then resumed to two
    run(text, "split", "SOLVER.EPOCHS", "2", "--resume")
    assert [untimed(r) for r in records(split)] == [untimed(r) for r in recs]
    for name in ("latest", "student_latest"):  # weights, optimizer, RNG states: bit for bit
        same(load_checkpoint(os.path.join(full, name)), load_checkpoint(os.path.join(split, name)), name)


def same(a, b, where):
    """``a`` and ``b`` hold equal values (tensors bit for bit), wall-clock timings aside."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k not in TIMING:
                same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b or a != a and b != b, where  # NaN (python's gauss state when unused) equals NaN


def test_eval_scores_a_text_checkpoint_as_the_run_did(text, capsys):
    from mdistiller_blockkd.cli import eval as eval_cli

    folder = os.path.join(text["root"], "out", "text", "teacher")
    m = eval_cli.main(["--cfg", text["cfg"], "--ckpt", os.path.join(folder, "student_latest"),
                       "-m", f"hf:{text['teacher']}", "LOG.PROGRESS", "False"])
    assert m["test_acc"] == pytest.approx(text["teacher_run"][-1]["test_acc"])
    assert m["test_loss"] == pytest.approx(text["teacher_run"][-1]["test_loss"], rel=1e-5)
    assert f": acc {m['test_acc']:.2f} loss" in capsys.readouterr().out  # SST-2's metric, no top-5


def test_the_fine_tuned_teacher_loads_into_the_teacher_and_beats_a_random_head(text):
    """student_best of a NONE run with the hf: model as student is the teacher format of that model."""
    folder = os.path.join(text["root"], "out", "text", "teacher")
    sd = load_checkpoint(os.path.join(folder, "student_best"))["model"]
    assert "classifier.weight" in sd and any(k.startswith("bert.encoder.layer.3.") for k in sd)
    model = build_model(f"hf:{text['teacher']}", num_classes=2)
    model.load_state_dict(sd, strict=True)
    assert text["teacher_run"][-1]["best_acc"] > 90  # it learnt the toy task: praise or pan


@pytest.mark.parametrize("opts", [
    ("DISTILLER.TYPE", "NONE"), ("DISTILLER.TYPE", "KD"), ("DISTILLER.TYPE", "DKD", "DKD.WARMUP", "1"),
    ("DISTILLER.TYPE", "LSKD"), ("BLOCKKD.STONES", "last:1"), ("BLOCKKD.STONES", "sample:1"),
    ("BLOCKKD.STONES", "every:2"), ("BLOCKKD.STONES", "all", "BLOCKKD.BATCH_STONES", "on")],
    ids=["none", "kd", "dkd", "lskd", "blockkd_last1", "blockkd_sample1", "blockkd_every2", "blockkd_all_batched"])
def test_every_distiller_trains_on_text(text, opts):
    name = "_".join(opts[1::2]).replace(":", "").lower()
    last = records(run(text, f"d_{name}", *opts))[-1]
    assert math.isfinite(last["train_loss"]) and 0 <= last["test_acc"] <= 100
    if "BLOCKKD.STONES" in opts:
        assert "acc_teacher" in last and any(k.startswith("acc_stone") for k in last)


def test_reviewkd_on_a_transformer_is_one_error(text, capsys):
    line = one_error(capsys, lambda: train.cli(["--cfg", text["cfg"], "EXPERIMENT.NAME", "reviewkd",
                                                 "DISTILLER.TYPE", "REVIEWKD"]))
    assert "REVIEWKD" in line and "transformer" in line and "BLOCKKD" in line


def test_text_data_and_models_must_go_together(text, tmp_path):
    cfg = load_cfg(text["cfg"], ["DISTILLER.STUDENT", "resnet8"])
    with pytest.raises(ConfigError, match="text but DISTILLER.STUDENT is 'resnet8'.*hf:"):
        check_distiller_config(cfg)
    cfg = load_cfg(text["cfg"], ["DATASET.TYPE", "synthetic"])
    with pytest.raises(ConfigError, match="DISTILLER.STUDENT is 'hf:.*a text model.*DATASET.TYPE glue or tsv"):
        check_distiller_config(cfg)
    with pytest.raises(ConfigError, match="MAX_LENGTH is 100 .* 64 tokens"):
        check_distiller_config(load_cfg(text["cfg"], ["DATASET.TEXT.MAX_LENGTH", 100]))


def predictions(text, folder, task, student):
    """The labels of GLUE ``task``'s dev file and a run's final student's predictions of them."""
    from mdistiller_blockkd.data.text import read_glue

    dev = read_glue(text["glue"], task, "dev")
    tok = load_tokenizer(f"hf:{text['teacher']}")
    first = [t[0] for t in dev.texts]
    second = [t[1] for t in dev.texts] if len(dev.texts[0]) > 1 else None
    enc = tok(first, second, truncation=True, max_length=16, padding=True, return_tensors="pt")
    model = build_model(student, num_classes=2).eval()
    model.load_state_dict(load_checkpoint(os.path.join(folder, "student_latest"))["model"])
    with torch.no_grad():
        pred = model(pack_text_batch(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))[0].argmax(1)
    return torch.tensor(dev.targets), pred


def binary_counts(y, p):
    tp, tn = int(((p == 1) & (y == 1)).sum()), int(((p == 0) & (y == 0)).sum())
    fp, fn = int(((p == 1) & (y == 0)).sum()), int(((p == 0) & (y == 1)).sum())
    return tp, tn, fp, fn


def test_cola_is_scored_by_matthews_and_its_best_epoch_chosen_on_the_validation_split(text):
    student = f"hf:{text['teacher']},layers=2"  # from the teacher's first layers (DistilBERT-style)
    folder = run(text, "cola", "DISTILLER.TYPE", "NONE", "DISTILLER.STUDENT", student, "DATASET.GLUE.TASK", "cola",
                 "DATASET.VAL_SPLIT", "8", "SOLVER.EPOCHS", "3", "SOLVER.LR", "3.0e-3")
    recs = records(folder)
    assert {"test_mcc", "test_acc", "val_mcc", "val_acc", "best_val_acc"} <= set(recs[-1])
    y, p = predictions(text, folder, "cola", student)
    tp, tn, fp, fn = binary_counts(y, p)
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert recs[-1]["test_mcc"] == pytest.approx(100 * (tp * tn - fp * fn) / den if den else 0.0)
    assert recs[-1]["test_acc"] == pytest.approx(100 * (tp + tn) / len(y))
    best = max(range(len(recs)), key=lambda i: (recs[i]["val_mcc"], i))  # ties: the later epoch, as the trainer
    assert recs[-1]["best_val_acc"] == recs[best]["val_mcc"] and recs[-1]["best_acc"] == recs[best]["test_mcc"]


def test_mrpc_is_scored_by_f1(text):
    student = f"hf:{text['student']}"
    folder = run(text, "mrpc", "DISTILLER.TYPE", "NONE", "DATASET.GLUE.TASK", "mrpc")
    last = records(folder)[-1]
    y, p = predictions(text, folder, "mrpc", student)
    tp, tn, fp, fn = binary_counts(y, p)
    assert last["test_f1"] == pytest.approx(100 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert last["best_acc"] == last["test_f1"]  # no validation split: the best test F1


def test_tsv_with_string_labels_trains(text, tmp_path):
    folder = tmp_path / "tsv"
    labels = {0: "negative", 1: "positive"}
    rows = {"train": sentences(24), "dev": sentences(8, offset=24), "test": sentences(8, offset=32)}
    for split, items in rows.items():
        write_lines(folder, f"{split}.tsv", ["id\tsentence\tlabel"] + [f"{i}\t{s}\t{labels[y]}"
                                                                       for i, (s, y) in enumerate(items)])
    out = run(text, "tsv", "DATASET.TYPE", "tsv", "DATASET.ROOT", str(folder), "BLOCKKD.STONES", "last:1")
    last = records(out)[-1]  # dev.tsv is the validation split, test.tsv the test set
    assert {"val_acc", "test_acc", "acc_stone2", "acc_teacher"} <= set(last) and "acc_stone1" not in last
    assert last["best_val_acc"] == last["val_acc"] and last["best_acc"] == last["test_acc"]


@pytest.mark.slow
def test_two_process_gloo_run_scores_the_whole_dev_set(text):
    """torchrun with 2 CPU processes on CoLA with Block-KD: each rank scores half of the dev set, and the
    logged Matthews correlation and accuracy are those of the whole set (the ranks' confusion counts summed),
    as one process computes them from the final student's predictions."""
    from test_cli import TRAIN, run as run_script

    rc, out, err = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN,
                               "--cfg", text["cfg"], "--brief", "EXPERIMENT.NAME", "ddp_cola",
                               "DATASET.GLUE.TASK", "cola"], timeout=240)
    assert rc == 0, err[-3000:]
    folder = os.path.join(text["root"], "out", "text", "ddp_cola")
    (last,) = records(folder)
    assert {"test_mcc", "test_acc", "acc_stone1", "acc_teacher"} <= set(last)
    y, p = predictions(text, folder, "cola", f"hf:{text['student']}")
    assert len(y) == 12  # the whole dev set, though each rank scored 6
    tp, tn, fp, fn = binary_counts(y, p)
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert last["test_mcc"] == pytest.approx(100 * (tp * tn - fp * fn) / den if den else 0.0, abs=1e-4)
    assert last["test_acc"] == pytest.approx(100 * (tp + tn) / len(y))
    assert load_checkpoint(os.path.join(folder, "latest"))["world_size"] == 2
