"""Text data (GLUE layout, tsv folders, the WordNet set), GLUE's metrics, and the fine-tuning recipe."""

import os

import pytest
import torch
from torch.utils.data import DataLoader

from mdistiller_blockkd.config import CFG, load_cfg
from mdistiller_blockkd.data import build_splits, dataset_description
from mdistiller_blockkd.data.common import PrivateRNGDataset
from mdistiller_blockkd.data.text import GLUE_TASKS, TextCollator, metric_names, read_glue
from mdistiller_blockkd.data.wordnet import gloss_without_lemmas, make_wordnet_set, read_noun_synsets
from mdistiller_blockkd.engine.optim import build_optimizer, clip_gradients
from mdistiller_blockkd.engine.trainer import learning_rate
from mdistiller_blockkd.errors import ConfigError, DatasetError, UserError
from mdistiller_blockkd.utils.metrics import (accuracy, binary_f1, confusion_matrix, matthews_corrcoef,
                                              metrics_from_confusion)

# --- GLUE files in GLUE's own layout (as download_glue_data.py writes them) --------------------
MNLI_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")


def _mnli(i, a, b, label):
    return f"{i}\t31193\t{i}n\tgovernment\t( ( {a} ) )\t( {b} )\t(ROOT (S {a}))\t(ROOT (S {b}))\t{a}\t{b}\t{label}\t{label}"


GLUE_FILES = {
    "CoLA": ["gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
             "gj04\t0\t*\tThey drank the pub.",
             "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.",
             "gj04\t0\t*\tThe more we study verbs, the crazier they get get."],
    "SST-2": ["sentence\tlabel", "hide new secretions from the parental units \t0",
              "contains no wit , only labored gags \t0", "that loves its characters \t1",
              'the "greatest" film of the year \t1'],
    "MRPC": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
             "1\t702876\t702977\tAmrozi accused his brother.\tReferring to him, Amrozi accused his brother.",
             "0\t2108705\t2108831\tYucaipa owned Dominick 's.\tYucaipa bought Dominick 's in 1995.",
             "1\t1330381\t1330521\tThey had published an advertisement.\tOn June 10, they published an ad.",
             "0\t3344667\t3344648\tThe stock rose $2.11.\tThe stock fell 4 percent."],
    "QQP": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            "133273\t213221\t213222\tHow is the life of a math student?\tWhich level of math?\t0",
            "402555\t536040\t536041\tHow do I control my horny emotions?\tHow do you control your horniness?\t1",
            "360472\t364011\t490273\tWhat causes stool color to change?\tWhat can cause stool to come out?\t0",
            "150662\t155721\t7256\tWhat can one do after MBBS?\tWhat do i do after my MBBS ?\t1"],
    "MNLI": [MNLI_HEAD, _mnli(0, "Conceptually cream skimming has two dimensions .", "Product and geography .", "neutral"),
             _mnli(1, "you know during the season", "You lose the things .", "entailment"),
             _mnli(2, "One of our number will carry out", "A member of my team .", "entailment"),
             _mnli(3, "How do you know ?", "This information belongs to them .", "contradiction")],
    "QNLI": ["index\tquestion\tsentence\tlabel",
             "0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it.\tnot_entailment",
             "1\tWhich missile batteries often have individual launchers?\tThe two cameras were used.\tnot_entailment",
             "2\tWhat two things does Popper argue Tarski's theory involves?\tHe bases this on two things.\tentailment",
             "3\tWhat is the name of the village?\tThe village is called Elm.\tentailment"],
    "RTE": ["index\tsentence1\tsentence2\tlabel",
            "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction Found in Iraq.\tnot_entailment",
            "1\tA place of sorrow, after Pope John Paul II died.\tPope Benedict XVI is the new leader.\tentailment",
            "2\tHerceptin was already approved.\tHerceptin can be used.\tentailment",
            "3\tJudie Vivian said that.\tJudie Vivian was there.\tnot_entailment"],
    "WNLI": ["index\tsentence1\tsentence2\tlabel",
             "0\tI stuck a pin through a carrot.\tThe carrot had a hole.\t1",
             "1\tJohn couldn't see the stage.\tJohn is so tall.\t0",
             "2\tThe police arrested all of the gang members.\tThe police were trying to stop the drug trade.\t1",
             "3\tSteve follows Fred's example.\tSteve influences him hugely.\t0"],
}


def write_glue(root):
    for folder, lines in GLUE_FILES.items():
        os.makedirs(root / folder, exist_ok=True)
        names = ["train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"] if folder == "MNLI" else ["train.tsv", "dev.tsv"]
        for name in names:
            (root / folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def glue(tmp_path):
    return write_glue(tmp_path / "glue_data")


@pytest.mark.parametrize("task", list(GLUE_TASKS))
def test_every_glue_task_reads_its_own_layout(glue, task):
    train = read_glue(str(glue), task, "train")
    dev = read_glue(str(glue), task, "dev")
    spec = GLUE_TASKS[task]
    assert len(train) == 4 and len(dev) == 4 and train.classes == list(spec.labels)
    texts, label = train[0]
    assert len(texts) == len(spec.text_columns) and isinstance(label, int)
    assert dev.source.endswith(spec.dev)


def test_glue_columns_are_the_right_ones(glue):
    assert read_glue(str(glue), "cola", "train")[1] == (("They drank the pub.",), 0)  # no header: line 1 is data
    assert read_glue(str(glue), "sst2", "train")[3] == (('the "greatest" film of the year ',), 1)  # quotes are text
    assert read_glue(str(glue), "mrpc", "train")[0] == (
        ("Amrozi accused his brother.", "Referring to him, Amrozi accused his brother."), 1)
    assert read_glue(str(glue), "qqp", "train")[1][1] == 1
    mnli = read_glue(str(glue), "mnli", "train")
    assert mnli[0] == (("Conceptually cream skimming has two dimensions .", "Product and geography ."), 2)
    assert read_glue(str(glue), "qnli", "train")[2][1] == 0 and read_glue(str(glue), "rte", "train")[0][1] == 1


def test_glue_errors_say_what_is_missing(glue):
    with pytest.raises(DatasetError, match="SST-2/train.tsv' not found.*download_glue_data.py.*holds SST-2/"):
        read_glue(str(glue.parent / "elsewhere"), "sst2", "train")
    with pytest.raises(DatasetError, match="holds train.tsv itself: give its parent folder"):
        read_glue(str(glue / "SST-2"), "sst2", "train")
    (glue / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(DatasetError, match="line 2 has label 'maybe'.*entailment, not_entailment"):
        read_glue(str(glue), "rte", "dev")
    (glue / "SST-2" / "dev.tsv").write_text("sentence\tlabel\njust a sentence\n")
    with pytest.raises(DatasetError, match="line 2 has 1 tab-separated fields, GLUE sst2 needs at least 2"):
        read_glue(str(glue), "sst2", "dev")
    with pytest.raises(ConfigError, match="DATASET.GLUE.TASK is 'stsb'"):
        build_splits(load_cfg(None, ["DATASET.TYPE", "glue", "DATASET.ROOT", str(glue), "DATASET.GLUE.TASK", "stsb"]))


def test_glue_dev_is_the_test_set_and_val_split_holds_training_examples_out(glue):
    cfg = load_cfg(None, ["DATASET.TYPE", "glue", "DATASET.ROOT", str(glue), "DATASET.GLUE.TASK", "mnli-mm",
                          "DATASET.VAL_SPLIT", 2])
    s = build_splits(cfg)
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (2, 2, 4, 3)
    assert s.test.source.endswith("dev_mismatched.tsv")
    held = {s.val[i][0] for i in range(2)}
    assert not held & {s.train[i][0] for i in range(2)}
    assert "val 2 (held out of train)" in dataset_description(cfg)
    assert metric_names(cfg) == ("acc",)
    assert metric_names(load_cfg(None, ["DATASET.TYPE", "glue", "DATASET.GLUE.TASK", "cola"])) == ("mcc", "acc")
    assert metric_names(load_cfg(None, ["DATASET.TYPE", "glue", "DATASET.GLUE.TASK", "mrpc"])) == ("f1", "acc")


def write_tsv(folder, splits, header="sentence\tsentence2\tlabel"):
    os.makedirs(folder, exist_ok=True)
    for name, rows in splits.items():
        (folder / f"{name}.tsv").write_text("\n".join([header] + rows) + "\n", encoding="utf-8")
    return folder


def test_tsv_folders_with_and_without_test_file(tmp_path):
    rows = ["a good film\tloved it\tpositive", "a bad film\thated it\tnegative", "fine\tok\tneutral",
            "great\twow\tpositive"]
    plain = write_tsv(tmp_path / "plain", {"train": rows, "dev": rows[:2]})
    s = build_splits(load_cfg(None, ["DATASET.TYPE", "tsv", "DATASET.ROOT", str(plain)]))
    assert s.val is None and len(s.test) == 2 and s.train.classes == ["negative", "neutral", "positive"]
    assert s.train[0] == (("a good film", "loved it"), 2)
    full = write_tsv(tmp_path / "full", {"train": rows, "dev": rows[1:3], "test": rows[:1]})
    cfg = load_cfg(None, ["DATASET.TYPE", "tsv", "DATASET.ROOT", str(full)])
    s = build_splits(cfg)
    assert len(s.val) == 2 and len(s.test) == 1 and s.val.source.endswith("dev.tsv")
    assert "val 2 (the set's own validation split)" in dataset_description(cfg)
    with pytest.raises(ConfigError, match="has test.tsv, so dev.tsv is the validation split"):
        build_splits(load_cfg(None, ["DATASET.TYPE", "tsv", "DATASET.ROOT", str(full), "DATASET.VAL_SPLIT", 1]))
    single = write_tsv(tmp_path / "single", {"train": ["7\tx\t1", "8\ty\t2"], "dev": ["9\tz\t1"]},
                       header="id\tsentence\tlabel")  # other columns are not read
    s = build_splits(load_cfg(None, ["DATASET.TYPE", "tsv", "DATASET.ROOT", str(single)]))
    assert s.test[0] == (("z",), 0) and s.train.classes == ["1", "2"]
    (single / "dev.tsv").write_text("id\tsentence\tlabel\n9\tz\t3\n")
    with pytest.raises(DatasetError, match="dev.tsv' has label\\(s\\) 3 that train.tsv does not have"):
        build_splits(load_cfg(None, ["DATASET.TYPE", "tsv", "DATASET.ROOT", str(single)]))
    bad = write_tsv(tmp_path / "bad", {"train": ["x\t1"], "dev": ["x\t1"]}, header="text\tlabel")
    with pytest.raises(DatasetError, match="must name the columns sentence and label"):
        build_splits(load_cfg(None, ["DATASET.TYPE", "tsv", "DATASET.ROOT", str(bad)]))
    with pytest.raises(DatasetError, match="train.tsv' not found; a tsv folder"):
        build_splits(load_cfg(None, ["DATASET.TYPE", "tsv", "DATASET.ROOT", str(tmp_path / "nothing")]))
    with pytest.raises(ConfigError, match="DATASET.TYPE tsv needs DATASET.ROOT"):
        build_splits(load_cfg(None, ["DATASET.TYPE", "tsv"]))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tok")
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] a good bad film loved it hated fine ok great wow".split()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return transformers.BertTokenizer.from_pretrained(str(folder))


def test_collator_pads_each_batch_to_its_longest_and_packs(tmp_path, tokenizer):
    rows = ["a good film\tloved it\tpositive", "bad\thated it\tnegative", "fine\tok\tneutral",
            "great great great great great great great great great great\twow\tpositive"]
    folder = write_tsv(tmp_path / "set", {"train": rows, "dev": rows})
    train = build_splits(load_cfg(None, ["DATASET.TYPE", "tsv", "DATASET.ROOT", str(folder)])).train
    collate = TextCollator(tokenizer, max_length=8)
    x, y = collate([train[1], train[2]])
    assert x.dtype == torch.long and x.shape == (2, 3, 6)  # [CLS] bad [SEP] hated it [SEP]; "fine ok" padded to it
    assert x[1, 1].tolist() == [1, 1, 1, 1, 1, 0] and x[0, 2].tolist() == [0, 0, 0, 1, 1, 1]
    assert y.tolist() == [0, 1]
    x, _ = collate([train[3]])
    assert x.shape == (1, 3, 8)  # cut at max_length
    loader = DataLoader(PrivateRNGDataset(train, torch.Generator().manual_seed(0)), batch_size=2, collate_fn=collate)
    assert [b[0].shape[0] for b in loader] == [2, 2]


def test_metrics_from_the_confusion_matrix():
    preds, targets = torch.tensor([1, 1, 0, 0, 1, 0]), torch.tensor([1, 0, 0, 0, 1, 1])
    cm = confusion_matrix(preds, targets, 2)
    assert cm.tolist() == [[2, 1], [1, 2]]
    assert accuracy(cm) == pytest.approx(400 / 6)
    assert binary_f1(cm) == pytest.approx(100 * 4 / 6)  # tp 2, fp 1, fn 1
    assert matthews_corrcoef(cm) == pytest.approx(100 * (2 * 2 - 1 * 1) / 9)  # (tp tn - fp fn) / sqrt(...) = 3/9
    assert matthews_corrcoef(confusion_matrix(torch.zeros(4), torch.tensor([0, 1, 0, 1]), 2)) == 0.0
    assert binary_f1(confusion_matrix(torch.zeros(2), torch.zeros(2), 2)) == 0.0
    # three classes: Gorodkin's R_K, as scikit-learn computes it
    p3, t3 = torch.tensor([0, 2, 1, 0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 0, 2, 1, 2, 0])
    cm3 = confusion_matrix(p3, t3, 3)
    assert cm3.tolist() == [[2, 0, 1], [0, 2, 1], [1, 0, 1]]
    # (correct n - t.p) / sqrt((n^2 - p.p)(n^2 - t.t)) with t = (3, 3, 2), p = (3, 2, 3): 19 / 42
    assert matthews_corrcoef(cm3) == pytest.approx(100 * 19 / 42)
    assert metrics_from_confusion(cm3, ("acc", "mcc")) == {"acc": 62.5, "mcc": pytest.approx(100 * 19 / 42)}
    # summed per-rank matrices give the whole-set values
    assert torch.equal(confusion_matrix(p3[:3], t3[:3], 3) + confusion_matrix(p3[3:], t3[3:], 3), cm3)


# --- WordNet -------------------------------------------------------------------------------------
LICENSE = ["  1 This software and database is being provided to you, the LICENSEE, by  ",
           "  2 Princeton University under the following license.  ", "  3   "]


def synset_line(offset, filenum, lemmas, gloss):
    words = " ".join(f"{w} 0" for w in lemmas)
    return f"{offset:08d} {filenum:02d} n {len(lemmas):02x} {words} 001 @ 00001740 n 0000 | {gloss}  "


def write_data_noun(path):
    lines = list(LICENSE)
    n = 0
    for filenum, word in ((4, "act"), (5, "animal"), (6, "tool")):
        for i in range(12):
            n += 1
            lines.append(synset_line(n, filenum, [f"{word}{i}", f"big_{word}{i}"],
                                     f"a {word} kind number {i} of {filenum}; \"the {word}{i} moved\""))
    lines.append(synset_line(900, 3, ["entity"], "that which exists"))  # noun.Tops: too small, dropped
    lines.append(synset_line(901, 4, ["dup"], "the same text"))
    lines.append(synset_line(902, 5, ["dup"], "the same text"))  # occurs twice: both dropped
    lines.append(synset_line(903, 6, ["gone"], "gone"))  # empty without its lemma
    lines.append(synset_line(904, 6, [f"w{k}" for k in range(10)], "ten lemmas: w0 and w9 go, the rest stays"))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_wordnet_data_file_format_and_lemma_removal(tmp_path):
    path = write_data_noun(tmp_path / "data.noun")
    synsets = read_noun_synsets(path)
    assert len(synsets) == 41 and synsets[0].supersense == "noun.act" and synsets[-1].lemmas[-1] == "w9"
    assert synsets[0].gloss == 'a act kind number 0 of 4; "the act0 moved"'
    assert gloss_without_lemmas(synsets[0].gloss, synsets[0].lemmas) == 'a act kind number 0 of 4; "the moved"'
    assert gloss_without_lemmas("Dogs and a dog; hot-dog stands; puppies", ["dog", "puppy", "hot_dog"]) == "and a ; - stands;"
    (tmp_path / "broken").write_text(synset_line(1, 99, ["x"], "y") + "\n")
    with pytest.raises(DatasetError, match="line 1 is not a WordNet noun synset line"):
        read_noun_synsets(str(tmp_path / "broken"))
    with pytest.raises(DatasetError, match="wordnet-base"):
        read_noun_synsets(str(tmp_path / "missing"))


def test_wordnet_set_is_balanced_seeded_and_says_what_it_dropped(tmp_path, capsys):
    from mdistiller_blockkd.cli.make_wordnet_set import cli

    source = write_data_noun(tmp_path / "data.noun")
    out = tmp_path / "set"
    summary = make_wordnet_set(str(out), source, per_class=10, dev=2, test=2, seed=3)
    assert summary["classes"] == ["noun.act", "noun.animal", "noun.artifact"]
    assert summary["dropped"]["noun.Tops"] == 1 and summary["duplicates"] == 2 and summary["empty"] == 1
    assert summary["sizes"] == {"train": 18, "dev": 6, "test": 6}
    readme = (out / "README.md").read_text()
    assert "noun.Tops (1 usable glosses)" in readme and "default_rng(3)" in readme
    s = build_splits(load_cfg(None, ["DATASET.TYPE", "tsv", "DATASET.ROOT", str(out)]))
    assert [s.train.targets.count(c) for c in range(3)] == [6, 6, 6] and len(s.val) == 6 and len(s.test) == 6
    texts = {t for ds in (s.train, s.val, s.test) for (t,), _ in ds}
    assert len(texts) == 30 and "the same text" not in texts
    with pytest.raises(UserError, match="already holds train.tsv, dev.tsv, test.tsv"):
        make_wordnet_set(str(out), source, per_class=10, dev=2, test=2, seed=3)
    again = tmp_path / "again"
    assert cli(["--out", str(again), "--source", source, "--per-class", "10", "--dev", "2", "--test", "2",
                "--seed", "3"]) == 0
    assert "dropped classes (fewer than 10 usable glosses): noun.Tops (1 usable)" in capsys.readouterr().out
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        assert (again / name).read_bytes() == (out / name).read_bytes()  # the seed fixes the set
    make_wordnet_set(str(out), source, per_class=10, dev=2, test=2, seed=4, overwrite=True)
    assert (out / "train.tsv").read_bytes() != (again / "train.tsv").read_bytes()
    with pytest.raises(SystemExit):
        cli(["--out", str(tmp_path / "x"), "--source", source, "--per-class", "3", "--dev", "2", "--test", "2"])
    assert capsys.readouterr().err.strip().startswith("error: --per-class 3")


# --- the recipe ----------------------------------------------------------------------------------
def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))]


def test_sgd_and_the_step_schedule_stay_mdistillers():
    cfg = load_cfg(None, [])
    o = build_optimizer(cfg, _params(), steps_per_epoch=10)
    assert isinstance(o.optimizer, torch.optim.SGD) and o.scheduler is None and o.clip_grad_norm == 0
    (group,) = o.optimizer.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 0.0001)
    assert [learning_rate(e, cfg) for e in (150, 151, 181, 240)] == [0.05, 0.05 * 0.1, 0.05 * 0.1 ** 2,
                                                                     0.05 * 0.1 ** 3]


def test_adamw_decays_weight_matrices_only():
    cfg = load_cfg(None, ["SOLVER.TYPE", "AdamW", "SOLVER.WEIGHT_DECAY", 0.01, "SOLVER.LR", 2e-5])
    o = build_optimizer(cfg, _params(), steps_per_epoch=10)
    assert isinstance(o.optimizer, torch.optim.AdamW)
    assert [(len(g["params"]), g["weight_decay"]) for g in o.optimizer.param_groups] == [(1, 0.01), (1, 0.0)]


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_warmup_schedules_are_berts_and_resume_exactly(name):
    transformers = pytest.importorskip("transformers")
    cfg = load_cfg(None, ["SOLVER.TYPE", "AdamW", "SOLVER.LR", 1e-3, "SOLVER.EPOCHS", 3, "SOLVER.SCHEDULER", name,
                          "SOLVER.WARMUP_EPOCHS", 0.5])
    o = build_optimizer(cfg, _params(), steps_per_epoch=10)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    make = {"linear": transformers.get_linear_schedule_with_warmup,
            "cosine": transformers.get_cosine_schedule_with_warmup}[name]
    ref = make(ref_opt, num_warmup_steps=5, num_training_steps=30)
    ours, theirs = [], []
    for step in range(1, 31):
        ours.append(o.optimizer.param_groups[0]["lr"])
        theirs.append(ref_opt.param_groups[0]["lr"])
        o.optimizer.step()
        o.scheduler.step_update(step)
        ref_opt.step()
        ref.step()
        if step == 12:  # a run killed here resumes with the same learning rates
            state = o.optimizer.state_dict()
    assert ours == pytest.approx(theirs, abs=1e-12) and ours[0] == 0.0 and max(ours) == pytest.approx(1e-3)
    resumed = build_optimizer(cfg, _params(), steps_per_epoch=10)
    resumed.optimizer.load_state_dict(state)
    got = []
    for step in range(13, 31):
        got.append(resumed.optimizer.param_groups[0]["lr"])
        resumed.optimizer.step()
        resumed.scheduler.step_update(step)
    assert got == ours[12:]


def test_gradient_clipping():
    p = _params()
    o = build_optimizer(load_cfg(None, ["SOLVER.CLIP_GRAD_NORM", 1.0]), p, steps_per_epoch=1)
    (p[0].sum() * 100 + p[1].sum() * 100).backward()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert clip_gradients(o.optimizer, scaler, 0.0) is None
    before = clip_gradients(o.optimizer, scaler, o.clip_grad_norm)
    assert before == pytest.approx(100 * 16 ** 0.5)
    assert torch.linalg.vector_norm(torch.cat([q.grad.flatten() for q in p])) == pytest.approx(1.0, rel=1e-5)


def test_recipe_and_text_keys_are_checked():
    bad = {("SOLVER.TYPE", "Adam"): "SOLVER.TYPE is 'Adam'; use SGD",
           ("SOLVER.SCHEDULER", "poly"): "SOLVER.SCHEDULER is 'poly'",
           ("SOLVER.WARMUP_EPOCHS", 1.0): "SOLVER.SCHEDULER is step, which has no warm-up",
           ("SOLVER.CLIP_GRAD_NORM", -1.0): "SOLVER.CLIP_GRAD_NORM is -1.0",
           ("DATASET.TEXT.MAX_LENGTH", 4): "DATASET.TEXT.MAX_LENGTH is 4"}
    for (key, value), match in bad.items():
        with pytest.raises(ConfigError, match=match):
            load_cfg(None, [key, value])
    with pytest.raises(ConfigError, match="WARMUP_EPOCHS is 240.0 but SOLVER.EPOCHS is 240"):
        load_cfg(None, ["SOLVER.SCHEDULER", "cosine", "SOLVER.WARMUP_EPOCHS", 240.0])
    assert CFG.SOLVER.SCHEDULER == "step" and CFG.SOLVER.TYPE == "SGD"  # mdistiller's recipe by default
