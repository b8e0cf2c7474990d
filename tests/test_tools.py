"""The benchmark and report tools: command lines, JSON schema, cost model, tables and plots."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdistiller_blockkd.config import load_cfg
from mdistiller_blockkd.errors import ConfigError, UserError
from mdistiller_blockkd import bench as bench_lib
from mdistiller_blockkd.bench import cost as bench_cost, entries as bench_entries
from mdistiller_blockkd.results.labels import variant_label
from mdistiller_blockkd.results.plots import MAX_SERIES, PANELS_PER_ROW
from mdistiller_blockkd.results.stats import mean_std, read_metrics
from mdistiller_blockkd.utils.overrides import split_overrides, split_top_level

REPO = Path(__file__).resolve().parents[1]
RESULT_KEYS = {"teacher", "student", "distiller", "variant", "precision", "channels_last", "batch_size", "ms_per_step",
               "images_per_s", "peak_mem_mb", "mem_ratio_to_kd", "ratio_to_kd", "ratio_to_fp32"}
TOP_KEYS = {"results", "device", "torch", "threads", "command"}


def checkout_env():
    """Environment of a subprocess that imports this checkout's package (the tools/ wrappers need it on the path)."""
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def load_tool(name):
    import importlib

    return importlib.import_module(f"mdistiller_blockkd.cli.{name}")


@pytest.fixture(scope="module")
def bench_tool():
    return load_tool("benchmark")


@pytest.fixture(scope="module")
def report():
    return load_tool("report")


# -- shared helpers -----------------------------------------------------------------
def test_overrides_and_labels():
    assert split_overrides(["A.B=1", "C.D", "2", "E.F=[[1,2],[3,4]]"]) == ["A.B", "1", "C.D", "2", "E.F", "[[1,2],[3,4]]"]
    with pytest.raises(ConfigError, match="has no value"):
        split_overrides(["A.B"])
    assert split_top_level("BLOCKKD.PAIRS=[[1,1],[2,2]],BLOCKKD.STONES=last:2") == [
        "BLOCKKD.PAIRS=[[1,1],[2,2]]", "BLOCKKD.STONES=last:2"]
    cfg = load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD", "BLOCKKD.STONES", "sample:1"])
    assert variant_label(cfg) == "sample:1"
    assert variant_label(load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD"])) == ""
    # a Block-KD key does not label a KD run
    assert variant_label(load_cfg(None, ["DISTILLER.TYPE", "KD", "BLOCKKD.STONES", "sample:1"])) == ""
    assert variant_label(load_cfg(None, ["DISTILLER.TYPE", "KD", "KD.TEMPERATURE", 2]), ["KD.TEMPERATURE"]) == "TEMPERATURE=2"
    m, s = mean_std([70.0, 72.0, 74.0])
    assert m == pytest.approx(72.0) and s == pytest.approx(2.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_benchmark_parsing(bench_tool):
    assert bench_entries.parse_pair("resnet56:resnet20") == ("resnet56", "resnet20")
    assert bench_entries.parse_pair("timm:resnet34:timm:resnet18") == ("timm:resnet34", "timm:resnet18")
    with pytest.raises(ConfigError, match="TEACHER:STUDENT"):
        bench_entries.parse_pair("resnet56")
    # hf: specs hold '/' and ',' but no ':' after the prefix
    minilm = "hf:data/models/all-MiniLM-L6-v2"
    assert bench_entries.parse_pair(f"{minilm}:{minilm},layers=3,pick=every_other") == (
        minilm, f"{minilm},layers=3,pick=every_other")
    assert bench_entries.parse_pair(f"{minilm}:resnet8") == (minilm, "resnet8")  # parsed; refused when built
    assert bench_entries.parse_variant("BLOCKKD.STONES=sample:1") == ("BLOCKKD", ["BLOCKKD.STONES", "sample:1"], "sample:1")
    kind, flat, label = bench_entries.parse_variant("BLOCKKD.STONES=last:2,BLOCKKD.T=2.0")
    assert (kind, label) == ("BLOCKKD", "last:2 T=2.0") and flat == ["BLOCKKD.STONES", "last:2", "BLOCKKD.T", "2.0"]
    with pytest.raises(ConfigError, match="distiller's node"):
        bench_entries.parse_variant("SOLVER.LR=0.1")
    with pytest.raises(ConfigError, match="distiller's node"):
        bench_entries.parse_variant("KD.TEMPERATURE=2,BLOCKKD.T=2")
    # step settings: alone (an entry of every distiller) or with one distiller's keys; not in the label
    assert bench_entries.parse_variant("SOLVER.AMP=bf16") == (None, ["SOLVER.AMP", "bf16"], "")
    assert bench_entries.parse_variant("BLOCKKD.STONES=last:2,SOLVER.AMP=bf16") == (
        "BLOCKKD", ["BLOCKKD.STONES", "last:2", "SOLVER.AMP", "bf16"], "last:2")
    # cost model arithmetic: 3F(S) + F(T) (+ 2 F(tail) + 3 F(C) per stone, expected share for sample:K)
    assert bench_cost.stone_share("sample", 1, 4) == [0.25] * 4
    assert bench_cost.stone_share("last", 2, 3) == [0.0, 1.0, 1.0]
    kd, bk = bench_cost.blockkd_costs(1.0, 3.0, [2.0, 1.0], [0.1, 0.1], [1.0, 1.0])
    assert kd == pytest.approx(6.0) and bk == pytest.approx(6.0 + 4.0 + 0.3 + 2.0 + 0.3)


def test_benchmark_cli_json_and_cost_model(tmp_path):
    out = tmp_path / "bench.json"
    names = ["NONE", "BLOCKKD", "KD"]
    cmd = [sys.executable, "-m", "mdistiller_blockkd", "benchmark", "--pairs", "resnet20:resnet8", "--distillers", *names,
           "--variants", "BLOCKKD.STONES=sample:1", "--batch-size", "4", "--warmup", "1", "--steps", "2", "--memory", "off",
           "--threads", "1", "--cost-model", "--json", str(out), "BLOCKKD.WARMUP=0"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=checkout_env())
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "ms/step" in proc.stdout and "cost model" in proc.stdout
    doc = json.loads(out.read_text())
    assert set(doc) == TOP_KEYS | {"cost_model"}
    assert doc["threads"] == 1 and doc["device"].startswith("cpu") and doc["command"].startswith("mdistiller-blockkd-benchmark")
    rows = {(r["distiller"], r["variant"]): r for r in doc["results"]}
    assert set(rows) == {(n, "") for n in names} | {("BLOCKKD", "sample:1")}
    for r in doc["results"]:
        assert set(r) == RESULT_KEYS
        assert (r["teacher"], r["student"], r["batch_size"]) == ("resnet20", "resnet8", 4)
        assert r["ms_per_step"] > 0 and r["peak_mem_mb"] is None and r["mem_ratio_to_kd"] is None
        assert r["images_per_s"] == pytest.approx(4 / (r["ms_per_step"] / 1000), rel=1e-3)
        kd_ms = rows[("KD", "")]["ms_per_step"]
        assert r["ratio_to_kd"] == pytest.approx(r["ms_per_step"] / kd_ms, rel=1e-3)
        assert (r["precision"], r["channels_last"], r["ratio_to_fp32"]) == ("fp32", False, None)
    # cost model: BLOCKKD all > KD > 0, and sampling one stone costs less than all of them
    costs = {c["variant"]: c for c in doc["cost_model"]}
    assert set(costs) == {"", "sample:1"}
    full, one = costs[""], costs["sample:1"]
    g = full["forward_gflops"]
    assert g["student"] > 0 and g["teacher"] > g["student"]
    assert 3 * g["student"] + g["teacher"] > 0
    assert full["flops_ratio_to_kd"] > 1.0 and full["time_ratio_to_kd"] > 1.0
    assert 1.0 < one["flops_ratio_to_kd"] < full["flops_ratio_to_kd"]
    assert full["num_stones"] == 3 and one["stones"] == "sample:1"
    n = full["num_stones"]
    tails = sum(2 * g[f"tail{k + 1}"] + 3 * g[f"connector{k + 1}"] for k in range(n))
    kd = 3 * g["student"] + g["teacher"]
    assert full["flops_ratio_to_kd"] == pytest.approx((kd + tails) / kd, rel=1e-6)
    assert one["flops_ratio_to_kd"] == pytest.approx((kd + tails / n) / kd, rel=1e-6)


def test_benchmark_main_in_process(bench_tool, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench_tool.main(["--pairs", "resnet8:resnet8", "--distillers", "NONE", "--batch-size", "2", "--warmup", "0",
                           "--steps", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc) == TOP_KEYS
    (r,) = doc["results"]
    assert set(r) == RESULT_KEYS and r["distiller"] == "NONE" and r["ratio_to_kd"] is None
    assert "NONE" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="not registered"):
        bench_tool.main(["--pairs", "resnet8:resnet8", "--distillers", "NOPE"])
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        bench_tool.main(["--pairs", "resnet8:nope", "--distillers", "NONE"])
    with pytest.raises(ConfigError, match="--steps"):
        bench_tool.main(["--steps", "0"])


def test_benchmark_compares_precisions_in_one_process(bench_tool, tmp_path, capsys):
    """--variants SOLVER.AMP=bf16 adds a bf16 twin of every entry; ratios to KD are taken at the same precision."""
    out = tmp_path / "p.json"
    assert bench_tool.main(["--pairs", "resnet8:resnet8", "--distillers", "KD", "BLOCKKD", "--variants", "SOLVER.AMP=bf16",
                            "BLOCKKD.STONES=last:2,SOLVER.AMP=bf16,SOLVER.CHANNELS_LAST=True", "--batch-size", "2",
                            "--warmup", "0", "--steps", "1", "--threads", "1", "--memory", "off", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "precision" in table and "x fp32" in table
    rows = {(r["distiller"], r["variant"], r["precision"], r["channels_last"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {("KD", "", "fp32", False), ("BLOCKKD", "", "fp32", False), ("KD", "", "bf16", False),
                         ("BLOCKKD", "", "bf16", False), ("BLOCKKD", "last:2", "bf16", True)}
    ms = {k: r["ms_per_step"] for k, r in rows.items()}
    for (kind, variant, prec, cl), r in rows.items():
        kd = ms[("KD", "", prec, cl)] if ("KD", "", prec, cl) in ms else None
        assert r["ratio_to_kd"] == (None if kd is None else pytest.approx(r["ms_per_step"] / kd, rel=1e-3))
        twin = ms.get((kind, variant, "fp32", cl))
        want = None if prec == "fp32" or twin is None else pytest.approx(r["ms_per_step"] / twin, rel=1e-3)
        assert r["ratio_to_fp32"] == want
    assert rows[("BLOCKKD", "", "bf16", False)]["ratio_to_fp32"] is not None


def test_benchmark_memory_is_measured_per_entry_in_isolation(tmp_path):
    """An entry's peak memory does not depend on the entries measured before it (each has a fresh process):
    in one process, a small entry after a large one reused the memory the large one freed and read near 0."""
    from mdistiller_blockkd.bench.memory import isolated_peak_mib, max_batch

    args = __import__("argparse").Namespace(device="cpu", batch_size=32, image_size=32, num_classes=10, seed=0)
    small = bench_lib.Entry("resnet8", "resnet8", "NONE", "", load_cfg(None, ["DISTILLER.TYPE", "NONE"]), "test")
    large = bench_lib.Entry("resnet20", "resnet8", "BLOCKKD", "", load_cfg(None, ["DISTILLER.TYPE", "BLOCKKD"]), "test")
    alone = isolated_peak_mib(small, args, steps=1, threads=1)
    big = isolated_peak_mib(large, args, steps=1, threads=1)
    after = isolated_peak_mib(small, args, steps=1, threads=1)
    assert alone > 1.0 and big > alone
    assert after == pytest.approx(alone, rel=0.25)
    # the largest batch within a budget, from two batch sizes (linear in the batch)
    assert max_batch(100.0, 64, 180.0, 128, 500.0) == 384
    assert max_batch(100.0, 64, 90.0, 128, 500.0) is None


def test_memory_child_starts_with_a_fixed_mmap_threshold(monkeypatch):
    """The fresh process starts with glibc's mmap threshold fixed, so its resident size follows the live tensors
    (with the adaptive threshold one entry read up to 70 MiB apart between runs); the parent's environment is kept."""
    import queue as queue_mod
    from mdistiller_blockkd.bench import memory

    seen = []

    class FakeProcess:
        exitcode = 0

        def __init__(self, target, args, daemon):
            self.q = args[-1]

        def start(self):
            seen.append(os.environ.get("MALLOC_MMAP_THRESHOLD_"))
            self.q.put(("ok", 1.0))

        def join(self, timeout=None):
            pass

    fake = __import__("types").SimpleNamespace(Queue=queue_mod.Queue, Process=FakeProcess)
    monkeypatch.setattr(memory.multiprocessing, "get_context", lambda kind: fake)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    entry = bench_lib.Entry("resnet8", "resnet8", "NONE", "", load_cfg(None, ["DISTILLER.TYPE", "NONE"]), "test")
    assert memory.isolated_peak_mib(entry, None) == 1.0
    assert seen == ["65536"] and "MALLOC_MMAP_THRESHOLD_" not in os.environ


def test_benchmark_budget_gives_the_largest_batch_per_entry(bench_tool, tmp_path, capsys):
    """--budget-mib measures each entry again at half the batch (a fresh process) and reports the largest batch
    whose peak fits the budget, from the two figures."""
    from mdistiller_blockkd.bench.memory import max_batch

    out = tmp_path / "m.json"
    assert bench_tool.main(["--pairs", "resnet8:resnet8", "--distillers", "NONE", "--batch-size", "8", "--warmup", "1",
                            "--steps", "1", "--threads", "1", "--budget-mib", "4096", "--json", str(out)]) == 0
    assert "batch in budget" in capsys.readouterr().out
    (r,) = json.loads(out.read_text())["results"]
    assert set(r) == RESULT_KEYS | {"peak_mem_half_batch_mb", "max_batch_in_budget"}
    # (computed from the unrounded figures; the JSON keeps two decimals of them)
    want = max_batch(r["peak_mem_half_batch_mb"], 4, r["peak_mem_mb"], 8, 4096.0)
    assert r["max_batch_in_budget"] == (None if want is None else pytest.approx(want, rel=0.05, abs=1))
    for bad, match in ((["--budget-mib", "0"], "--budget-mib is 0.0"), (["--budget-mib", "nan"], "--budget-mib is nan"),
                       (["--budget-mib", "100", "--memory", "off"], "leave out --memory off"),
                       (["--budget-mib", "100", "--batch-size", "1"], "give at least 2")):
        with pytest.raises(ConfigError, match=match):
            bench_tool.main(["--pairs", "resnet8:resnet8", "--distillers", "NONE", *bad])


def test_benchmark_help():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark.py"), "--help"], capture_output=True,
                          text=True, timeout=60, env=checkout_env())
    assert proc.returncode == 0 and "--cost-model" in proc.stdout and "round-robin" in proc.stdout


# -- benchmark: text pairs -----------------------------------------------------------
@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """Tiny random BERT folders with a tokenizer (tests/test_hf_models.py's): a 4-layer teacher (hidden 32, 64
    positions) and a 2-layer student of its vocabulary (hidden 24)."""
    pytest.importorskip("transformers")
    from test_hf_models import save_bert

    root = tmp_path_factory.mktemp("bench_hf")
    return {"teacher": save_bert(root / "teacher", 4, 32), "student": save_bert(root / "student", 2, 24, seed=1)}


TEXT_STEP = ["--batch-size", "2", "--warmup", "0", "--steps", "1", "--threads", "1", "--memory", "off"]


def test_benchmark_times_a_text_pair(bench_tool, hf_pair, tmp_path, capsys):
    """--pairs takes two hf: encoders; their batch is B sequences of --seq-len random token ids packed as the
    text loader packs them; KD and BLOCKKD at fp32 and bf16 are timed with their ratios."""
    t = f"hf:{hf_pair['teacher']}"
    s = f"{t},layers=2,pick=every_other"
    out = tmp_path / "t.json"
    assert bench_tool.main(["--pairs", f"{t}:{s}", "--distillers", "KD", "BLOCKKD", "--variants", "SOLVER.AMP=bf16",
                            "--seq-len", "8", *TEXT_STEP, "--json", str(out), "BLOCKKD.CONNECTOR", "linear_ln"]) == 0
    printed = capsys.readouterr().out
    assert "batch 2x8 tokens;" in printed and "x3x" not in printed.splitlines()[0]
    rows = {(r["distiller"], r["precision"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {("KD", "fp32"), ("BLOCKKD", "fp32"), ("KD", "bf16"), ("BLOCKKD", "bf16")}
    for (kind, prec), r in rows.items():
        assert (r["teacher"], r["student"], r["batch_size"]) == (t, s, 2) and r["ms_per_step"] > 0
        assert r["ratio_to_kd"] == pytest.approx(r["ms_per_step"] / rows[("KD", prec)]["ms_per_step"], rel=1e-3)
        want = None if prec == "fp32" else pytest.approx(r["ms_per_step"] / rows[(kind, "fp32")]["ms_per_step"],
                                                         rel=1e-3)
        assert r["ratio_to_fp32"] == want
    # the batch: (B, 3, L) token ids of the teacher's vocabulary, full mask, segment 0 (TextCollator's layout)
    args = bench_tool.build_parser().parse_args(["--pairs", f"{t}:{s}", "--distillers", "KD", "--seq-len", "8",
                                                 "--batch-size", "3"])
    (e,) = bench_entries.build_entries(args, [])
    runner = bench_lib.Runner(args)
    runner.build(e)
    vocab = e.model.teacher.config.vocab_size
    assert e.x.shape == (3, 3, 8) and e.x.dtype == torch.long and int(e.cfg.DATASET.TEXT.MAX_LENGTH) == 8
    assert int(e.x[:, 0].min()) >= 0 and int(e.x[:, 0].max()) < vocab
    assert bool((e.x[:, 1] == 1).all()) and bool((e.x[:, 2] == 0).all())
    assert e.y.shape == (3,) and int(e.y.max()) < args.num_classes == 100


def test_benchmark_times_a_text_config_without_its_data(bench_tool, hf_pair, tmp_path, monkeypatch, capsys):
    """--cfg takes a text config (DATASET.TYPE tsv) whose data folder does not exist: the batch is synthetic;
    a Block-KD variant, the cost model, the profile and the saved tensors work on it."""
    cfg = tmp_path / "text.yaml"
    cfg.write_text(f"_BASE_: {REPO / 'configs/wordnet/minilm_l6_l3/blockkd.yaml'}\n"
                   f"DISTILLER: {{TEACHER: 'hf:{hf_pair['teacher']}', STUDENT: 'hf:{hf_pair['student']}'}}\n")
    monkeypatch.chdir(tmp_path)  # no data/wordnet_supersense here
    out = tmp_path / "c.json"
    assert bench_tool.main(["--cfg", str(cfg), "--distillers", "KD", "--variants", "BLOCKKD.STONES=last:2",
                            "--seq-len", "8", *TEXT_STEP, "--cost-model", "--profile", "1", "--saved-tensors",
                            "--json", str(out)]) == 0
    assert "batch 2x8 tokens;" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    rows = {(r["distiller"], r["variant"]): r for r in doc["results"]}
    # the variant names every method option its config sets (the config's connector too), as the report names runs
    assert set(rows) == {("BLOCKKD", "linear_ln"), ("KD", ""), ("BLOCKKD", "last:2 linear_ln")}
    assert all(r["precision"] == "bf16" and r["ratio_to_kd"] > 0 for r in rows.values())  # the config's SOLVER.AMP
    assert {c["stones"] for c in doc["cost_model"]} == {"all", "last:2"}
    assert all(c["flops_ratio_to_kd"] > 1.0 for c in doc["cost_model"])
    assert len(doc["profile"]) == len(doc["saved_tensors"]) == 3
    assert all(p["parts_ms"].get("student forward", 0) > 0 for p in doc["profile"])


def test_benchmark_text_entry_memory_in_a_fresh_process(hf_pair):
    """--memory isolated: the fresh process builds the text entry from the options it is given (its --seq-len)."""
    from mdistiller_blockkd.bench.memory import isolated_peak_mib

    args = __import__("argparse").Namespace(pairs=[f"hf:{hf_pair['teacher']}:hf:{hf_pair['student']}"], cfg=None,
                                            distillers=["KD"], variants=[], device="cpu", batch_size=2, seq_len=8,
                                            image_size=None, num_classes=10, seed=0)
    (e,) = bench_entries.build_entries(args, [])
    assert isolated_peak_mib(e, args, steps=1, threads=1) > 0


def test_benchmark_text_options_and_errors(bench_tool, hf_pair, capsys):
    from test_errors import one_error

    t, s = f"hf:{hf_pair['teacher']}", f"hf:{hf_pair['student']}"
    text = ["--pairs", f"{t}:{s}", "--distillers", "KD", *TEXT_STEP]
    cases = [
        (["--pairs", f"{t}:resnet8", "--distillers", "KD"], f"the pair {t}:resnet8 mixes a text model"),
        (["--pairs", f"resnet8:{s}", "--distillers", "KD"], f"the pair resnet8:{s} mixes a text model"),
        (["--pairs", "resnet8:resnet8", "--distillers", "KD", "--seq-len", "8"], "--seq-len 8 is the length of text"),
        (text + ["--image-size", "64"], "--image-size 64 is the side of image batches"),
        (text + ["--seq-len", "65"], f"--seq-len is 65 but '{t}' has position embeddings for 64 tokens"),
        (text + ["--seq-len", "0"], "--seq-len is 0; it must be >= 1"),
        (text + ["--channels-last"], "SOLVER.CHANNELS_LAST True is a layout of image batches"),
        (text + ["--variants", "SOLVER.CHANNELS_LAST=True"], "SOLVER.CHANNELS_LAST True is a layout of image batches"),
    ]
    for argv, match in cases:
        assert match in one_error(capsys, lambda: bench_tool.cli(argv))
    # a text and an image pair in one run: each entry has its own batch, both shapes in the header
    assert bench_tool.main(["--pairs", f"{t}:{s}", "resnet8:resnet8", "--distillers", "KD", "--seq-len", "8",
                            *TEXT_STEP]) == 0
    assert "batch 2x8 tokens and 2x3x32x32;" in capsys.readouterr().out


# -- report -------------------------------------------------------------------------
def write_run(root, name, kind, seed, accs, epochs=None, teacher="resnet56", student="resnet20", extra=None,
              stones=0, tail="", val=None, final_files=True, scores=None):
    """A run directory as the trainer writes it: config.yaml (cfg.dump()), metrics.jsonl and, when every
    epoch is there and ``final_files``, the final checkpoints (empty files). ``scores``: ``{key: values}``
    added to the epochs' records (a text task's ``test_mcc``, ``val_f1``...)."""
    d = root / name
    d.mkdir(parents=True)
    opts = ["DISTILLER.TYPE", kind, "DISTILLER.TEACHER", teacher, "DISTILLER.STUDENT", student,
            "EXPERIMENT.SEED", seed, "SOLVER.EPOCHS", epochs or len(accs)] + list(extra or [])
    (d / "config.yaml").write_text(load_cfg(None, opts).dump())
    lines = []
    best = -1.0
    for e, acc in enumerate(accs, 1):
        best = max(best, acc)
        rec = {"epoch": e, "lr": 0.05, "train_loss": 1.0, "loss_ce": 1.0, "train_acc": acc - 5, "test_acc": acc,
               "test_acc_top5": acc + 10, "test_loss": 1.5, "best_acc": best, "epoch_time_s": 30.0, "ms_per_step": 10.0}
        for k in range(stones):
            rec[f"acc_stone{k + 1}"] = acc + k + 1
        if stones:
            rec["acc_teacher"] = 72.34
        if val is not None:
            rec["val_acc"] = val[e - 1]
        rec.update({k: v[e - 1] for k, v in (scores or {}).items()})
        lines.append(json.dumps(rec))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
    if final_files and len(accs) >= (epochs or len(accs)):
        for name in ("latest", "student_latest", f"ckpt_epoch_{len(accs)}.pth"):
            (d / name).write_bytes(b"")
    return d


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "output"
    for seed, accs in enumerate([[50.0, 70.0, 65.0], [55.0, 72.0, 66.0], [60.0, 74.0, 67.0]]):
        write_run(root, f"kd/s{seed}", "KD", seed, accs)
    write_run(root, "none/s0", "NONE", 0, [40.0, 60.0, 61.0], teacher="ResNet50")
    write_run(root, "bkd/s0", "BLOCKKD", 0, [52.0, 71.0, 70.5], stones=3)
    write_run(root, "bkd/s1", "BLOCKKD", 1, [53.0, 73.0, 72.5], stones=3)
    # sample:1, one finished seed and one in progress (2 of 3 epochs, half-written third line)
    write_run(root, "bkd_s1/s0", "BLOCKKD", 0, [50.0, 69.0, 68.0], extra=["BLOCKKD.STONES", "sample:1"], stones=3)
    write_run(root, "bkd_s1/s1", "BLOCKKD", 1, [51.0, 66.0], epochs=3, extra=["BLOCKKD.STONES", "sample:1"],
              stones=3, tail='{"epoch": 3, "test_a')
    write_run(root, "kd_other/s0", "KD", 0, [30.0, 40.0], teacher="resnet32x4", student="resnet8x4")
    (root / "empty").mkdir()
    (root / "empty" / "config.yaml").write_text(load_cfg(None, ["DISTILLER.TYPE", "KD"]).dump())
    (root / "empty" / "metrics.jsonl").write_text("")
    (root / "noconfig").mkdir()
    (root / "noconfig" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 1.0}) + "\n")
    return root


def table_rows(text, heading):
    """``{method: [cells]}`` of the markdown table under ``heading``."""
    part = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for line in rows[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = dict(zip(header[1:], cells[1:]))
    return out


def test_report_table_and_plots(report, runs, tmp_path, capsys):
    out_md = tmp_path / "results.md"
    plots = tmp_path / "plots"
    assert report.main(["--root", str(runs), "--out", str(out_md), "--plots", str(plots)]) == 0  # matplotlib: a dependency
    captured = capsys.readouterr()
    text = out_md.read_text(encoding="utf-8")
    assert text == captured.out
    best = table_rows(text, "## Best top-1")
    last = table_rows(text, "## Last-epoch top-1")
    assert list(best) == ["NONE", "KD", "BLOCKKD", "BLOCKKD sample:1"]
    col, other = "resnet56->resnet20", "resnet32x4->resnet8x4"
    assert best["KD"][col] == "72.00 ± 2.00 (3 seeds)"
    assert last["KD"][col] == "66.00 ± 1.00 (3 seeds)"
    assert best["NONE"][col] == "61.00 (1 seed)" and best["NONE"][other] == "–"
    s = math.sqrt(2.0)  # std of (71, 73) and of (70.5, 72.5)
    assert best["BLOCKKD"][col] == f"72.00 ± {s:.2f} (2 seeds)"
    assert last["BLOCKKD"][col] == f"71.50 ± {s:.2f} (2 seeds)"
    # partial run counted with its epochs so far: best (69, 66), last (68, 66)
    assert best["BLOCKKD sample:1"][col] == "67.50 ± 2.12 (2 seeds, 1 partial)"
    assert last["BLOCKKD sample:1"][col] == f"67.00 ± {s:.2f} (2 seeds, 1 partial)"
    assert best["KD"][other] == "40.00 (1 seed)"
    assert "partial (2/3)" in text
    # every run with its own minutes (30 s an epoch here), and their sum: 25 epochs in 9 runs
    assert "9 runs took 12 minutes in all" in text
    runs_part = text.split("## Runs", 1)[1]
    assert "| KD | 0 | 3 | 70.00 | 65.00 | 1.5 | complete |" in runs_part
    assert "| BLOCKKD sample:1 | 1 | 2 | 66.00 | 66.00 | 1.0 | partial (2/3) |" in runs_part
    diff = table_rows(text, "## Best top-1 minus KD")
    assert list(diff) == ["NONE", "BLOCKKD", "BLOCKKD sample:1"] and list(diff["NONE"]) == [col, other]
    assert diff["NONE"][col] == "-11.00"  # one seed: no standard error
    assert diff["BLOCKKD"][col] == f"+0.00 ± {math.sqrt(4 / 3 + 2 / 2):.2f} (+0.0)"
    se = math.sqrt(4 / 3 + 4.5 / 2)  # (69, 66) against (70, 72, 74)
    assert diff["BLOCKKD sample:1"][col] == f"-4.50 ± {se:.2f} ({-4.5 / se:+.1f})"
    stones = text.split("## Block-KD stepping stones", 1)[1].split("\n## ", 1)[0]
    assert "| resnet56->resnet20 | BLOCKKD | 2 | student 71.50, stone1 72.50, stone2 73.50, stone3 74.50, teacher 72.34 |" in stones
    assert table_rows(text, "## Training cost")["BLOCKKD"][col] == "10 (100.00 steps/s, 1.00× KD)"
    warnings = captured.err
    assert "empty" in warnings and "no epoch with a test_acc" in warnings
    assert "noconfig" in warnings and "no config.yaml" in warnings
    assert "not valid JSON" in warnings and "included as partial" in warnings
    for name in ("test_acc.png", "stones_resnet56_resnet20.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(os.listdir(plots)) == ["stones_resnet56_resnet20.png", "test_acc.png"]


def test_report_run_dirs_duplicates_and_errors(report, runs, tmp_path, capsys):
    dup = write_run(tmp_path / "again", "kd_dup", "KD", 0, [10.0, 20.0, 99.0])
    longer = write_run(tmp_path / "again", "kd_long", "KD", 0, [10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    assert report.main([str(runs / "kd" / "s0"), str(runs / "kd" / "s1"), str(dup), str(longer),
                        str(tmp_path / "missing")]) == 0
    captured = capsys.readouterr()
    best = table_rows(captured.out, "## Best top-1")
    # the duplicate seed-0 run (same recipe, read later) replaces kd/s0: best (99, 72)
    assert best["KD"]["resnet56->resnet20"] == "85.50 ± 19.09 (2 seeds)"
    assert "share pair" in captured.err and "missing" in captured.err
    # a run trained for more epochs than the report's majority is its own variant, not a duplicate
    assert best["KD EPOCHS=6"]["resnet56->resnet20"] == "60.00 (1 seed)"
    with pytest.raises(UserError, match="no usable run"):
        report.main([str(tmp_path / "missing")])
    with pytest.raises(UserError, match="RUN_DIR"):
        report.main([])


def test_report_calls_a_run_complete_only_with_its_final_checkpoints(report, tmp_path, capsys):
    """Every epoch recorded is not enough: a run stopped while saving its last epoch lacks its final files."""
    root = tmp_path / "output"
    write_run(root, "kd/s0", "KD", 0, [50.0, 70.0])
    write_run(root, "kd/s1", "KD", 1, [52.0, 72.0], final_files=False)
    os.remove(write_run(root, "kd/s2", "KD", 2, [54.0, 74.0]) / "ckpt_epoch_2.pth")
    assert report.main(["--root", str(root)]) == 0
    captured = capsys.readouterr()
    runs_part = captured.out.split("## Runs", 1)[1]
    assert "| KD | 0 | 2 | 70.00 | 70.00 | 1.0 | complete |" in runs_part
    assert "| KD | 1 | 2 | 72.00 | 72.00 | 1.0 | partial (2/2, final checkpoints missing) |" in runs_part
    assert "| KD | 2 | 2 | 74.00 | 74.00 | 1.0 | partial (2/2, final checkpoints missing) |" in runs_part
    assert "(3 seeds, 2 partial)" in captured.out
    assert "final checkpoint(s) latest, student_latest, ckpt_epoch_2.pth are missing" in captured.err
    assert "final checkpoint(s) ckpt_epoch_2.pth are missing" in captured.err


def test_report_without_matplotlib(report, runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match="pip install matplotlib"):
        report.main(["--root", str(runs), "--plots", "unused"])


def test_report_cli_subprocess(runs, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "report.py"), "--root", str(runs)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=checkout_env())
    assert proc.returncode == 0, proc.stderr
    assert "| KD | 72.00 ± 2.00 (3 seeds) |" in proc.stdout
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "report.py"), str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=60, env=checkout_env())
    assert proc.returncode == UserError.exit_code and proc.stderr.strip().splitlines()[-1].startswith("error:")


def test_read_metrics_keeps_last_record_of_repeated_epoch(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"epoch": 2, "test_acc": 5}\n{"epoch": 1, "test_acc": 1}\n\n{"epoch": 2, "test_acc": 7}\n[1]\n')
    recs, warns = read_metrics(str(p))
    assert [(r["epoch"], r["test_acc"]) for r in recs] == [(1, 1), (2, 7)]
    assert len(warns) == 1 and "not a JSON object" in warns[0]


def test_report_names_an_lskd_setting_apart_from_the_default(report, tmp_path, capsys):
    """Two LSKD settings in one report are two rows: the one off the package default is named by what differs."""
    root = tmp_path / "lskd"
    for seed in range(2):
        write_run(root, f"lskd/s{seed}", "LSKD", seed, [60.0, 70.0], val=[61.0, 69.0])
        write_run(root, f"lskd_t4/s{seed}", "LSKD", seed, [60.0, 75.0], val=[61.0, 74.0],
                  extra=["LSKD.T", 4.0, "LSKD.CE_WEIGHT", 1.0, "LSKD.KD_WEIGHT", 1.0])
    assert report.main(["--root", str(root)]) == 0
    val = table_rows(capsys.readouterr().out, "## Validation top-1, last epoch")
    assert val == {"LSKD": {"resnet56->resnet20": "69.00 ± 0.00 (2 seeds)"},
                   "LSKD T=4.0 CE_WEIGHT=1.0 KD_WEIGHT=1.0": {"resnet56->resnet20": "74.00 ± 0.00 (2 seeds)"}}


def test_report_labels_every_pair_of_a_dataset_against_one_reference(report, tmp_path, capsys):
    """Hyper-parameters are named against the majority of the dataset's runs, not of each pair: a pair whose
    own runs lean the other way (here vgg, more runs without the detach) or split evenly reads like the
    others, so one row means one setting in every column."""
    root = tmp_path / "tie"
    detach = ["BLOCKKD.DETACH_ENSEMBLE", True]
    for seed in range(2):
        for pair, (t, s) in (("r", ("resnet56", "resnet20")), ("v", ("vgg13", "vgg8"))):
            write_run(root, f"{pair}_det/s{seed}", "BLOCKKD", seed, [60.0, 70.0], val=[61.0, 70.0],
                      teacher=t, student=s, extra=detach)
        write_run(root, f"r_det_more/s{seed}", "BLOCKKD", seed, [60.0, 70.0], val=[61.0, 70.0],
                  extra=detach + ["BLOCKKD.GAMMA", 0.0])
    for seed in range(3):  # vgg: 3 runs without the detach against its own 2 with it
        for pair, (t, s) in (("r", ("resnet56", "resnet20")), ("v", ("vgg13", "vgg8"))):
            if pair == "v" or seed < 2:
                write_run(root, f"{pair}_free/s{seed}", "BLOCKKD", seed, [60.0, 72.0], val=[61.0, 72.0],
                          teacher=t, student=s, extra=["BLOCKKD.DETACH_ENSEMBLE", False])
    assert report.main(["--root", str(root)]) == 0
    val = table_rows(capsys.readouterr().out, "## Validation top-1, last epoch")
    assert val["BLOCKKD"] == {"resnet56->resnet20": "70.00 ± 0.00 (2 seeds)", "vgg13->vgg8": "70.00 ± 0.00 (2 seeds)"}
    assert val["BLOCKKD DETACH_ENSEMBLE=False"] == {"resnet56->resnet20": "72.00 ± 0.00 (2 seeds)",
                                                    "vgg13->vgg8": "72.00 ± 0.00 (3 seeds)"}
    assert "BLOCKKD DETACH_ENSEMBLE=True" not in val


def test_report_validation_tables_majority_labels_and_costs(report, tmp_path, capsys):
    """Runs with a validation split: tables to choose on, differences to several baselines; hyper-parameters
    name a variant only where they differ from the other runs; --cost adds step costs and the cost plot."""
    root = tmp_path / "study"
    study = ["BLOCKKD.WARMUP", 2, "BLOCKKD.T", 4.0]  # shared by every Block-KD run: names nothing
    for seed in range(3):
        write_run(root, f"kd/s{seed}", "KD", seed, [60.0, 70.0 + seed], val=[61.0, 69.0 + seed])
        write_run(root, f"bkd/s{seed}", "BLOCKKD", seed, [62.0, 74.0 + seed], val=[63.0, 80.0 - seed],
                  extra=study)
        write_run(root, f"bkd_g0/s{seed}", "BLOCKKD", seed, [62.0, 72.0 + seed], val=[64.0, 71.0 + seed],
                  extra=study + ["BLOCKKD.GAMMA", 0.0])
        write_run(root, f"bkd_e3/s{seed}", "BLOCKKD", seed, [61.0, 73.0], val=[62.0, 72.0 + 2 * seed],
                  extra=study + ["BLOCKKD.STONES", "every:3", "BLOCKKD.STONE_SCALE", "none"])
        write_run(root, f"bkd_d/s{seed}", "BLOCKKD", seed, [61.0, 75.0], val=[62.0, 74.0],
                  extra=study + ["BLOCKKD.STONES", "every:3", "BLOCKKD.STONE_SCALE", "none", "BLOCKKD.DENSE_EPOCHS", 1])
    bench = tmp_path / "bench.json"
    rows = [{"teacher": "resnet56", "student": "resnet20", "distiller": d, "variant": v, "ratio_to_kd": r}
            for d, v, r in (("KD", "", 1.0), ("BLOCKKD", "", 1.9), ("BLOCKKD", "every:3 STONE_SCALE=none", 1.3))]
    bench.write_text(json.dumps({"results": rows}))
    plots = tmp_path / "plots"
    assert report.main(["--root", str(root), "--baseline", "BLOCKKD", "--baseline", "KD", "--cost", str(bench),
                        "--plots", str(plots)]) == 0
    out = capsys.readouterr().out
    col = "resnet56->resnet20"
    val = table_rows(out, "## Validation top-1, last epoch")
    assert list(val) == ["KD", "BLOCKKD", "BLOCKKD GAMMA=0.0", "BLOCKKD every:3 STONE_SCALE=none",
                         "BLOCKKD every:3 STONE_SCALE=none DENSE_EPOCHS=1"]
    assert val["BLOCKKD"][col] == "79.00 ± 1.00 (3 seeds)"
    at_best = table_rows(out, "## Test top-1 at the epoch of best validation top-1")
    assert at_best["BLOCKKD"][col] == "75.00 ± 1.00 (3 seeds)"
    # validation: GAMMA=0.0 (72 ± 1) minus Block-KD (79 ± 1): -7 ± sqrt(2/3)
    d = table_rows(out, "## Validation top-1 (last epoch) minus BLOCKKD")
    se = math.sqrt(2 / 3)
    assert d["BLOCKKD GAMMA=0.0"][col] == f"-7.00 ± {se:.2f} ({-7 / se:+.1f})"
    assert "## Test top-1 (last epoch) minus KD" in out and "## Validation top-1 (last epoch) minus KD" in out
    assert "## Best top-1 minus" not in out  # with a validation split, differences are on val and last test
    cost = table_rows(out, "## Training cost")
    assert "benchmark 1.30× KD, 2.6 KD-epochs" in cost["BLOCKKD every:3 STONE_SCALE=none"][col]
    # DENSE_EPOCHS 1 of 2 epochs: (1 x 1.9 + 1 x 1.3) / 2 = 1.60 per step, 3.2 KD-epochs
    assert "benchmark 1.60× KD, 3.2 KD-epochs" in cost["BLOCKKD every:3 STONE_SCALE=none DENSE_EPOCHS=1"][col]
    # a hyper-parameter variant costs what its method costs (same stones): matched by the method options
    assert "benchmark 1.90× KD" in cost["BLOCKKD"][col] and "benchmark 1.90× KD" in cost["BLOCKKD GAMMA=0.0"][col]
    assert (plots / "cost_acc.png").stat().st_size > 1000
    # a broken or missing cost file is one clear error
    bench.write_text("{}")
    with pytest.raises(UserError, match="not a benchmark --json file"):
        report.main(["--root", str(root), "--cost", str(bench)])
    with pytest.raises(UserError, match="not found"):
        report.main(["--root", str(root), "--cost", str(tmp_path / "nope.json")])


def test_report_baseline_by_type_names_its_one_row(report, tmp_path, capsys):
    """Every run in bf16: the rows read `KD AMP=bf16`, and `--baseline KD` (and the default) name that row;
    a type with two rows is a warning that names both, not a silent pick."""
    root = tmp_path / "bf16"
    amp = ["SOLVER.AMP", "bf16"]
    for seed in range(2):
        write_run(root, f"kd/s{seed}", "KD", seed, [60.0, 70.0 + seed], val=[61.0, 69.0 + seed], extra=amp)
        write_run(root, f"lskd/s{seed}", "LSKD", seed, [60.0, 72.0 + seed], val=[61.0, 72.0 + seed], extra=amp)
        write_run(root, f"lskd4/s{seed}", "LSKD", seed, [60.0, 71.0], val=[61.0, 71.0],
                  extra=amp + ["LSKD.T", 4.0])
    for argv in (["--baseline", "KD"], []):
        assert report.main(["--root", str(root), *argv]) == 0
        cap = capsys.readouterr()
        assert "## Validation top-1 (last epoch) minus KD AMP=bf16 (points)" in cap.out, argv
        assert "--baseline" not in cap.err
    assert report.main(["--root", str(root), "--baseline", "LSKD"]) == 0
    cap = capsys.readouterr()
    assert "minus LSKD" not in cap.out
    assert "--baseline LSKD: several rows of that method (LSKD AMP=bf16, LSKD AMP=bf16 T=4.0)" in cap.err



def test_report_cost_takes_the_row_of_the_runs_precision(report, tmp_path, capsys):
    """A benchmark file with fp32 and bf16 rows of one entry: a bf16 run's cost is the bf16 row's ratio and an
    fp32 run's the fp32 row's (before, the last row of the file served both)."""
    root = tmp_path / "prec"
    for seed in range(2):
        write_run(root, f"bkd/s{seed}", "BLOCKKD", seed, [60.0, 70.0])
        write_run(root, f"bkd16/s{seed}", "BLOCKKD", seed, [60.0, 70.0], extra=["SOLVER.AMP", "bf16"])
        write_run(root, f"kd16/s{seed}", "KD", seed, [60.0, 70.0], extra=["SOLVER.AMP", "bf16"])
    bench = tmp_path / "bench.json"
    rows = [{"teacher": "resnet56", "student": "resnet20", "distiller": d, "variant": "", "precision": p,
             "ratio_to_kd": r} for d, p, r in (("KD", "fp32", 1.0), ("BLOCKKD", "fp32", 1.9),
                                               ("KD", "bf16", 1.0), ("BLOCKKD", "bf16", 2.2))]
    bench.write_text(json.dumps({"results": rows}))
    assert report.main(["--root", str(root), "--cost", str(bench)]) == 0
    cost = table_rows(capsys.readouterr().out, "## Training cost")
    col = "resnet56->resnet20"
    assert "benchmark 1.90× KD" in cost["BLOCKKD"][col]
    assert "benchmark 2.20× KD" in cost["BLOCKKD AMP=bf16"][col]
    assert "benchmark 1.00× KD" in cost["KD AMP=bf16"][col]

def test_report_ranks_glue_cola_by_mcc_and_mrpc_by_f1(report, tmp_path, capsys):
    """GLUE runs are ranked by their task's metric (as the trainer's best epoch): CoLA by Matthews correlation,
    MRPC by F1, SST-2 by accuracy; each task is its own column, and the headings name the metric."""
    root = tmp_path / "glue"
    glue = ["DATASET.TYPE", "glue", "DATASET.GLUE.TASK"]
    text = dict(teacher="bert", student="tiny")
    cola = {  # CoLA with a validation split: accuracy and MCC disagree on every table
        ("KD", 0): ([70.0, 80.0], [71.0, 81.0], [30.0, 20.0], [40.0, 35.0]),
        ("KD", 1): ([72.0, 82.0], [73.0, 83.0], [34.0, 24.0], [38.0, 36.0]),
        ("BLOCKKD", 0): ([60.0, 65.0], [61.0, 66.0], [40.0, 50.0], [45.0, 55.0]),
        ("BLOCKKD", 1): ([62.0, 67.0], [63.0, 68.0], [42.0, 52.0], [47.0, 57.0]),
    }
    for (kind, seed), (acc, val, mcc, val_mcc) in cola.items():
        write_run(root, f"cola_{kind}/s{seed}", kind, seed, acc, val=val, extra=glue + ["cola", "DATASET.VAL_SPLIT", 100],
                  scores={"test_mcc": mcc, "val_mcc": val_mcc}, **text)
    mrpc = {("KD", 0): ([80.0, 85.0], [88.0, 86.0]), ("KD", 1): ([81.0, 86.0], [86.0, 87.0]),
            ("BLOCKKD", 0): ([79.0, 84.0], [89.0, 90.0]), ("BLOCKKD", 1): ([78.0, 83.0], [91.0, 90.0])}
    for (kind, seed), (acc, f1) in mrpc.items():
        write_run(root, f"mrpc_{kind}/s{seed}", kind, seed, acc, extra=glue + ["mrpc"], scores={"test_f1": f1}, **text)
    write_run(root, "sst2_kd/s0", "KD", 0, [90.0, 91.0], extra=glue + ["sst2"], **text)
    bad = write_run(root, "nope/s0", "KD", 0, [1.0], extra=glue + ["nope"], **text)
    assert report.main(["--root", str(root)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    c_col, m_col = "glue/cola: bert->tiny (CoLA Matthews corr.)", "glue/mrpc: bert->tiny (MRPC F1)"
    s_col = "glue/sst2: bert->tiny (top-1)"
    best = table_rows(out, "## Best score (%)")
    assert best["KD"] == {c_col: "32.00 ± 2.83 (2 seeds)", m_col: "87.50 ± 0.71 (2 seeds)", s_col: "91.00 (1 seed)"}
    assert best["BLOCKKD"][c_col] == "51.00 ± 1.41 (2 seeds)" and best["BLOCKKD"][m_col] == "90.50 ± 0.71 (2 seeds)"
    assert table_rows(out, "## Last-epoch score (%)")["KD"][c_col] == "22.00 ± 2.83 (2 seeds)"
    val = table_rows(out, "## Validation score, last epoch (%)")
    assert val["KD"] == {c_col: "35.50 ± 0.71 (2 seeds)", m_col: "–", s_col: "–"}
    at_best = table_rows(out, "## Test score at the epoch of best validation score (%)")
    assert at_best["KD"][c_col] == "32.00 ± 2.83 (2 seeds)"  # the epoch of best val MCC (1), not of best val_acc (2)
    diff = table_rows(out, "## Test score (last epoch) minus KD")  # MCC minus MCC, F1 minus F1
    assert diff["BLOCKKD"][c_col].startswith("+29.00 ± ") and diff["BLOCKKD"][m_col].startswith("+3.50 ± ")
    assert "| glue/cola: bert->tiny (CoLA Matthews corr.) | KD | 0 | 2 | 30.00 | 20.00 |" in out
    assert "| glue/mrpc: bert->tiny (MRPC F1) | BLOCKKD | 1 | 2 | 91.00 | 90.00 |" in out
    assert "DATASET.GLUE.TASK is 'nope'" in captured.err and str(bad) not in out
    # one task alone: the headings name its metric
    assert report.main([str(root / "cola_KD" / "s0"), str(root / "cola_BLOCKKD" / "s0")]) == 0
    out = capsys.readouterr().out
    assert table_rows(out, "## Best CoLA Matthews corr. (%)") == {"KD": {"bert->tiny": "30.00 (1 seed)"},
                                                                   "BLOCKKD": {"bert->tiny": "50.00 (1 seed)"}}
    assert "## Validation CoLA Matthews corr., last epoch (%)" in out
    assert "| best CoLA Matthews corr. | last CoLA Matthews corr. |" in out


def test_step_profile_splits_a_blockkd_step_into_its_parts(bench_tool):
    """Every part of a Block-KD step gets time; KD has no stones; the teacher forward holds no backward."""
    import argparse

    import torch

    args = argparse.Namespace(device="cpu", batch_size=4, image_size=32, num_classes=10, seed=0)
    runner = bench_lib.Runner(args)
    parts = {}
    for kind in ("KD", "BLOCKKD"):
        cfg = load_cfg(None, ["DISTILLER.TYPE", kind, "DISTILLER.TEACHER", "resnet8", "DISTILLER.STUDENT", "resnet8"])
        e = bench_lib.Entry("resnet8", "resnet8", kind, "", cfg, "test")
        runner.build(e)
        runner.step(e)
        parts[kind] = runner.profile(e, steps=1)
    kd, bk = parts["KD"], parts["BLOCKKD"]
    for part in ("student forward", "student backward", "teacher forward", "optimizer"):
        assert kd[part] > 0 and bk[part] > 0, part
    for part in ("stones forward", "stones backward", "connectors forward", "connectors backward"):
        assert bk[part] > 0 and part not in kd, part
    assert bk["losses forward"] > 0
    assert "teacher backward" not in bk and "teacher backward" not in kd
    # the teacher's own pass is one forward of the same modules the stones run with autograd on
    assert set(bk) <= {f"{p} {d}" for p in ("student", "teacher", "stones", "connectors", "losses")
                       for d in ("forward", "backward")} | {"optimizer", "backward other"}
    # the wrapped staged methods are restored: no instance attribute is left behind
    assert "forward_block" not in vars(e.model.student)
    assert torch.is_grad_enabled()


def test_report_plots_stay_readable_with_many_methods(report, tmp_path):
    """20 methods on one pair: at most MAX_SERIES series a panel, distinct colour and marker within a panel,
    legends outside the axes, panels wrapping at PANELS_PER_ROW, no PNG over 2400 px."""
    import matplotlib

    matplotlib.use("Agg")
    from PIL import Image

    root = tmp_path / "runs"
    stones = ["all", "last:1", "last:2", "sample:1", "sample:2", "every:2", "every:3"]
    variants = [("KD", []), ("DKD", []), ("LSKD", []), ("NONE", []), ("KD", ["SOLVER.EPOCHS", 6])]
    variants += [("BLOCKKD", ["BLOCKKD.STONES", s]) for s in stones]
    variants += [("BLOCKKD", [f"BLOCKKD.{k}", v]) for k, v in [("T", 2.0), ("BETA", 2.0), ("BETA", 0.5), ("GAMMA", 0.0),
                                                               ("WARMUP", 0), ("WARMUP", 4), ("STONE_WEIGHTS", "uniform"),
                                                               ("LOGIT_LOSS", "dkd")]]
    for i, (kind, extra) in enumerate(variants):
        write_run(root, f"m{i}", kind, 0, [50.0 + i, 60.0 + i, 61.0 + i / 2], extra=extra, stones=3 * (kind == "BLOCKKD"))
    costs = tmp_path / "bench.json"
    rows = []
    for kind, extra in variants:
        cfg = load_cfg(None, ["DISTILLER.TYPE", kind] + [str(v) for v in extra])
        rows.append({"teacher": "resnet56", "student": "resnet20", "distiller": kind,
                     "variant": variant_label(cfg), "ratio_to_kd": 1.0 + len(rows) / 10})
    costs.write_text(json.dumps({"results": rows}))
    plots = tmp_path / "plots"
    seen_axes = []
    import matplotlib.figure

    real_savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        seen_axes.extend(ax for ax in fig.axes if ax.get_visible())
        return real_savefig(fig, *a, **k)

    matplotlib.figure.Figure.savefig = spy
    try:
        assert report.main(["--root", str(root), "--plots", str(plots), "--cost", str(costs)]) == 0
    finally:
        matplotlib.figure.Figure.savefig = real_savefig
    pngs = sorted(plots.glob("*.png"))
    assert {p.name for p in pngs} == {"test_acc.png", "cost_acc.png", "stones_resnet56_resnet20.png"}
    for p in pngs:
        w, h = Image.open(p).size
        assert w <= 2400 and h <= 2400, (p.name, w, h)
    assert seen_axes
    for ax in seen_axes:
        series = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        series += [c for c in ax.containers]  # errorbar points
        named = [s for s in series if not s.get_label().startswith(("Pareto", "_"))]
        assert len(named) <= MAX_SERIES, ax.get_title()
        styles = [(str(getattr(s, "get_color", lambda: s.lines[0].get_color())()),
                   getattr(s, "get_marker", lambda: s.lines[0].get_marker())()) for s in named]
        assert len(set(styles)) == len(styles), ax.get_title()  # distinct colour and marker within a panel
        legend = ax.get_legend()
        assert legend is not None and legend.get_bbox_to_anchor().y0 < ax.get_window_extent().y0  # below the axes
    assert max(len([a for a in seen_axes if a.get_figure() is f]) for f in {a.get_figure() for a in seen_axes}) >= 5
    assert all(a.get_subplotspec().colspan.start < PANELS_PER_ROW for a in seen_axes)


@pytest.fixture
def outside_distiller():
    """A distiller registered from outside the package (as a plugin would), removed afterwards."""
    from mdistiller_blockkd.distillers import KD
    from mdistiller_blockkd.registry import DISTILLERS, register_distiller

    @register_distiller("TESTKD")
    class TestKD(KD):
        """KD under another name, labelled by KD.TEMPERATURE (an option of its own config node)."""

        type_name = "TESTKD"
        config_node = "KD"
        label_keys = ("KD.TEMPERATURE",)
        table_order = 45

    try:
        yield TestKD
    finally:
        DISTILLERS.pop("TESTKD")


def test_the_plots_in_docs_fit_a_screen_and_every_link_to_one_resolves():
    """No PNG under docs/ is over 2,400 px a side (one row of 22 panels was 9,062 px), and the markdown
    links to PNGs in README.md and docs/ name files that exist."""
    import re

    from PIL import Image

    sizes = {p: Image.open(p).size for p in (REPO / "docs").rglob("*.png")}
    assert sizes and not {p: s for p, s in sizes.items() if max(s) > 2400}
    for md in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]:
        for link in re.findall(r"\]\(([^)\s]+\.png)\)", md.read_text(encoding="utf-8")):
            assert (md.parent / link).is_file(), (md, link)


def test_an_outside_distiller_shows_in_the_report_and_the_benchmark(outside_distiller, bench_tool, report, tmp_path,
                                                                     capsys):
    from mdistiller_blockkd.results.labels import label_keys, method_sort_key

    assert "KD.TEMPERATURE" in label_keys() and "TESTKD" in bench_entries.default_distillers()
    assert method_sort_key("KD") < method_sort_key("TESTKD") < method_sort_key("BLOCKKD")
    # benchmark: in the default list of distillers, timed beside KD
    out = tmp_path / "b.json"
    assert bench_tool.main(["--pairs", "resnet8:resnet8", "--batch-size", "2", "--warmup", "0", "--steps", "1", "--memory", "off",
                            "--threads", "1", "--json", str(out)]) == 0
    kinds = {r["distiller"]: r for r in json.loads(out.read_text())["results"]}
    assert "TESTKD" in kinds and kinds["TESTKD"]["ratio_to_kd"] is not None
    # report: its own row, its option labels a variant, ordered by its table_order
    root = tmp_path / "runs"
    write_run(root, "kd", "KD", 0, [60.0, 61.0])
    write_run(root, "t", "TESTKD", 0, [62.0, 63.0])
    write_run(root, "t2", "TESTKD", 0, [64.0, 65.0], extra=["KD.TEMPERATURE", 2])
    write_run(root, "b", "BLOCKKD", 0, [66.0, 67.0], stones=3)
    capsys.readouterr()
    assert report.main(["--root", str(root)]) == 0
    text = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "±" not in line]
    first = [r for r in rows if r in ("KD", "TESTKD", "TESTKD TEMPERATURE=2", "BLOCKKD")]
    assert first[:4] == ["KD", "TESTKD", "TESTKD TEMPERATURE=2", "BLOCKKD"], rows


def test_saved_tensor_breakdown_names_the_stones():
    """KD saves for its student only; Block-KD adds the stones' passes through the teacher and the connectors;
    last:2 keeps fewer stone tensors than all."""
    import argparse

    args = argparse.Namespace(device="cpu", batch_size=8, image_size=32, num_classes=10, seed=0)
    runner = bench_lib.Runner(args)
    saved = {}
    for kind, extra in [("KD", []), ("BLOCKKD", []), ("BLOCKKD", ["BLOCKKD.STONES", "last:2"])]:
        cfg = load_cfg(None, ["DISTILLER.TYPE", kind, "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT", "resnet8"] + extra)
        e = bench_lib.Entry("resnet20", "resnet8", kind, "", cfg, "test")
        runner.build(e)
        runner.step(e)
        saved[(kind, tuple(extra))] = runner.saved_tensors(e)
    kd, full, last2 = saved[("KD", ())], saved[("BLOCKKD", ())], saved[("BLOCKKD", ("BLOCKKD.STONES", "last:2"))]
    assert set(kd) <= {"student", "losses"} and kd["student"]["bytes"] > 0
    assert full["stones"]["bytes"] > 0 and full["connectors"]["bytes"] > 0
    assert 0 < last2["stones"]["bytes"] < full["stones"]["bytes"]
    assert full["student"]["bytes"] == pytest.approx(kd["student"]["bytes"], rel=0.05)  # the same student pass
    assert "teacher" not in full  # the teacher's own pass saves nothing (no autograd)


def test_report_twin_table_compares_each_method_with_its_fp32_twin(report, tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in range(2):
        for kind in ("KD", "BLOCKKD"):
            write_run(root, f"{kind}_fp32_s{seed}", kind, seed, [60.0, 70.0 + seed], val=[61.0, 71.0 + seed])
            write_run(root, f"{kind}_bf16_s{seed}", kind, seed, [60.0, 70.5 + seed], val=[61.0, 70.0 + seed],
                      extra=["SOLVER.AMP", "bf16"])
    assert report.main(["--root", str(root), "--twin", "AMP=bf16"]) == 0
    text = capsys.readouterr().out
    section = text.split("## Validation top-1 (last epoch): AMP=bf16 minus the same method without it")[1]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in section.splitlines()[:12]
            if line.startswith("| ") and not line.startswith("| method")}
    assert rows["KD"].startswith("-1.00 ± 0.00") or rows["KD"].startswith("-1.00")
    assert set(rows) >= {"KD", "BLOCKKD"}
    assert "KD AMP=bf16" in text  # the bf16 runs are their own rows, not mixed with fp32 seeds


def test_report_names_bf16_runs_even_when_most_runs_are_bf16(report, tmp_path, capsys):
    """The precision is named against the package default (fp32), never against the report's majority."""
    root = tmp_path / "runs"
    write_run(root, "KD_fp32_s0", "KD", 0, [60.0, 70.0], val=[61.0, 71.0])
    for seed in range(2):
        write_run(root, f"KD_bf16_s{seed}", "KD", seed, [60.0, 70.5], val=[61.0, 70.0], extra=["SOLVER.AMP", "bf16"])
    assert report.main(["--root", str(root)]) == 0
    text = capsys.readouterr().out
    assert "| KD AMP=bf16 |" in text and "| KD |" in text and "AMP=off" not in text


def test_report_cost_is_the_median_step_time_so_a_paused_epoch_does_not_move_it(report, tmp_path, capsys):
    """One epoch of a run that was paused (or shared the machine) times 50x slower: the cost table's ms/step is
    the median over epochs, then over seeds, so it stays at the other epochs' 10 ms (100 steps/s); the mean
    would read 173 ms."""
    root = tmp_path / "runs"
    write_run(root, "kd", "KD", 0, [60, 61, 62], scores={"ms_per_step": [10.0, 500.0, 10.0]})
    write_run(root, "blockkd", "BLOCKKD", 0, [60, 61, 62], scores={"ms_per_step": [20.0, 20.0, 20.0]})
    assert report.main(["--root", str(root)]) == 0
    cost = table_rows(capsys.readouterr().out, "## Training cost")
    assert cost["KD"]["resnet56->resnet20"] == "10 (100.00 steps/s, 1.00× KD)"
    assert cost["BLOCKKD"]["resnet56->resnet20"] == "20 (50.00 steps/s, 2.00× KD)"


def test_plot_titles_wrap_long_model_names():
    """A long pair name (an hf: folder) wraps at the title width, breaking after '->', ',' and '/', and reads
    the same once joined: side-by-side panel titles no longer run into each other."""
    from mdistiller_blockkd.results.plots import TITLE_WIDTH, _wrap_title
    name = "hf:data/models/all-MiniLM-L6-v2->hf:data/models/all-MiniLM-L6-v2,layers=3,pick=every_other: baselines"
    lines = _wrap_title(name).split("\n")
    assert len(lines) > 1 and all(len(x) <= TITLE_WIDTH for x in lines)
    assert "".join(lines) == name
    assert lines[0].endswith(("->", ",", "/")) and "\u200b" not in "".join(lines)
    assert _wrap_title("resnet56->resnet20: baselines") == "resnet56->resnet20: baselines"


def test_report_label_keys_plus_keeps_two_teachers_apart(report, tmp_path, capsys):
    """The same method and seeds distilled from two teachers: by default one row (the runs of a seed collide);
    --label-keys +DISTILLER.TEACHER_CKPT adds the key to the default ones, so each teacher is its own row and
    the method's options still name the variant. Mixing KEY and +KEY is one clear error."""
    root = tmp_path / "teachers"
    for seed in range(2):
        for t, acc in (("t0", 70.0), ("t1", 72.0)):
            write_run(root, f"bkd_{t}/s{seed}", "BLOCKKD", seed, [60.0, acc],
                      extra=["BLOCKKD.STONES", "last:2", "DISTILLER.TEACHER_CKPT", f"out/teacher_{t}/student_best"])
    runs = [str(p) for p in sorted(root.glob("bkd_t*/s*"))]
    assert report.main([*runs, "--label-keys", "+DISTILLER.TEACHER_CKPT"]) == 0
    last = table_rows(capsys.readouterr().out, "## Last-epoch top-1")
    # the majority teacher is a tie, settled by the value read first (t0): t1 is named
    assert last == {"BLOCKKD last:2": {"resnet56->resnet20": "70.00 ± 0.00 (2 seeds)"},
                    "BLOCKKD last:2 TEACHER_CKPT=out/teacher_t1/student_best": {"resnet56->resnet20":
                                                                               "72.00 ± 0.00 (2 seeds)"}}
    with pytest.raises(UserError, match="not both"):
        report.main([*runs, "--label-keys", "BLOCKKD.STONES", "+DISTILLER.TEACHER_CKPT"])
