"""Text classification data: GLUE in its own layout, and any folder of TSV files.

``DATASET.TYPE glue``
    ``DATASET.ROOT`` (default ``./data/glue_data``) is the folder GLUE's
    ``download_glue_data.py`` writes, one sub-folder per task; ``DATASET.GLUE.TASK`` picks
    the task. Files and columns (0-based; tab-separated, no quoting, as Hugging Face's
    GLUE processors read them):

    ========  ========  ======  ================  =====  ==================================  ============
    task      folder    header  text columns      label  labels                              metrics
    ========  ========  ======  ================  =====  ==================================  ============
    cola      CoLA      no      3                 1      0, 1                                mcc, acc
    sst2      SST-2     yes     0                 1      0, 1                                acc
    mrpc      MRPC      yes     3, 4              0      0, 1                                f1, acc
    qqp       QQP       yes     3, 4              5      0, 1                                f1, acc
    mnli      MNLI      yes     8, 9              last   contradiction, entailment, neutral  acc
    mnli-mm   MNLI      yes     8, 9              last   (the same)                          acc
    qnli      QNLI      yes     1, 2              last   entailment, not_entailment          acc
    rte       RTE       yes     1, 2              last   entailment, not_entailment          acc
    wnli      WNLI      yes     1, 2              last   0, 1                                acc
    ========  ========  ======  ================  =====  ==================================  ============

    Training reads ``train.tsv``; the test set is the dev file (``dev.tsv``; MNLI:
    ``dev_matched.tsv``, ``mnli-mm``: ``dev_mismatched.tsv``): GLUE's test labels are
    not public. ``DATASET.VAL_SPLIT`` holds training examples out as for images. GLUE
    cannot be downloaded by this toolbox: a missing file is one error naming it.

``DATASET.TYPE tsv``
    ``DATASET.ROOT`` holds ``train.tsv`` and ``dev.tsv`` (and optionally ``test.tsv``),
    tab-separated with a header row naming the columns ``sentence``, optionally
    ``sentence2`` (sentence pairs), and ``label`` (any strings; other columns are not
    read). The classes are the sorted distinct labels of ``train.tsv``. Without
    ``test.tsv`` the dev file is the test set (as GLUE); with it, ``dev.tsv`` is the
    validation split (``DATASET.VAL_SPLIT`` must then be 0) and ``test.tsv`` the test set.
    The WordNet set of ``make-wordnet-set`` is such a folder.

Items are ``((sentence,) or (sentence, sentence2), label index)``; every set has
``targets`` and ``classes``. Tokenisation happens per batch in :class:`TextCollator`
(the loader's ``collate_fn``), which pads each batch to its longest example (at most
``DATASET.TEXT.MAX_LENGTH`` tokens) and returns the packed ``(B, 3, L)`` batch of
:mod:`mdistiller_blockkd.utils.text_batch` and the labels. :func:`metric_names` gives
the metrics of a config (first: the one that selects the best epoch).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DatasetError
from ..utils.text_batch import pack_text_batch

__all__ = ["TEXT_TYPES", "GLUE_TASKS", "GlueTask", "TextDataset", "TextCollator", "build_glue", "build_tsv", "read_glue",
           "read_tsv_folder", "metric_names", "DEFAULT_GLUE_ROOT"]

DEFAULT_GLUE_ROOT = "./data/glue_data"
#: The ``DATASET.TYPE`` values of text data.
TEXT_TYPES = ("glue", "tsv")


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's files are and how to read them (see the module docstring)."""

    folder: str
    header: bool
    text_columns: Tuple[int, ...]
    label_column: int
    labels: Tuple[str, ...]
    dev: str = "dev.tsv"
    metrics: Tuple[str, ...] = ("acc",)


_BINARY = ("0", "1")
_NLI = ("entailment", "not_entailment")
GLUE_TASKS = {
    "cola": GlueTask("CoLA", False, (3,), 1, _BINARY, metrics=("mcc", "acc")),
    "sst2": GlueTask("SST-2", True, (0,), 1, _BINARY),
    "mrpc": GlueTask("MRPC", True, (3, 4), 0, _BINARY, metrics=("f1", "acc")),
    "qqp": GlueTask("QQP", True, (3, 4), 5, _BINARY, metrics=("f1", "acc")),
    "mnli": GlueTask("MNLI", True, (8, 9), -1, ("contradiction", "entailment", "neutral"), dev="dev_matched.tsv"),
    "mnli-mm": GlueTask("MNLI", True, (8, 9), -1, ("contradiction", "entailment", "neutral"),
                        dev="dev_mismatched.tsv"),
    "qnli": GlueTask("QNLI", True, (1, 2), -1, _NLI),
    "rte": GlueTask("RTE", True, (1, 2), -1, _NLI),
    "wnli": GlueTask("WNLI", True, (1, 2), -1, _BINARY),
}


class TextDataset(Dataset):
    """Examples ``(texts, label index)``: ``texts`` is ``(sentence,)`` or ``(sentence, sentence2)``.

    ``targets`` (label indices), ``classes`` (label strings, index order) and ``source``
    (the file read) describe it.
    """

    def __init__(self, texts: Sequence[Tuple[str, ...]], targets: Sequence[int], classes: Sequence[str], source: str):
        if len(texts) != len(targets):
            raise ValueError(f"{len(texts)} texts but {len(targets)} labels")
        self.texts = [tuple(t) for t in texts]
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.source = source

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.texts[index], self.targets[index]


def _read_rows(path: str, missing_hint: str) -> List[List[str]]:
    """The rows of a TSV file (tab-separated, no quoting, UTF-8 with or without BOM)."""
    if not os.path.isfile(path):
        raise DatasetError(f"'{path}' not found; {missing_hint}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as e:
        raise DatasetError(f"'{path}' is not UTF-8 text ({e}); write the TSV files in UTF-8") from None
    except (OSError, csv.Error) as e:
        raise DatasetError(f"could not read '{path}': {e}") from None


def _glue_hint(root: str, task: GlueTask) -> str:
    hint = (f"GLUE cannot be downloaded by this toolbox: run GLUE's download_glue_data.py (or copy the {task.folder} "
            f"folder) on a machine with network access and set DATASET.ROOT to the folder that holds {task.folder}/")
    if os.path.isfile(os.path.join(root, "train.tsv")):
        hint += f" ('{root}' holds train.tsv itself: give its parent folder)"
    return hint


def read_glue(root: str, name: str, split: str) -> TextDataset:
    """GLUE task ``name``'s ``train`` or ``dev`` split under ``root`` (GLUE's own layout)."""
    task = GLUE_TASKS[name]
    path = os.path.join(root, task.folder, "train.tsv" if split == "train" else task.dev)
    rows = _read_rows(path, _glue_hint(root, task))
    need = max(max(task.text_columns), task.label_column) + 1
    texts, targets = [], []
    index = {label: i for i, label in enumerate(task.labels)}
    for line, row in enumerate(rows[1:] if task.header else rows, start=2 if task.header else 1):
        if len(row) < need:
            raise DatasetError(f"'{path}' line {line} has {len(row)} tab-separated fields, GLUE {name} needs at least "
                               f"{need}; is this GLUE's {task.folder} file?")
        label = row[task.label_column].strip()
        if label not in index:
            raise DatasetError(f"'{path}' line {line} has label '{label}', GLUE {name} has {', '.join(task.labels)}; "
                               f"is this GLUE's {task.folder} file?")
        texts.append(tuple(row[c] for c in task.text_columns))
        targets.append(index[label])
    if not targets:
        raise DatasetError(f"'{path}' holds no examples")
    return TextDataset(texts, targets, task.labels, path)


def read_tsv_folder(root: str, split: str, classes: Optional[Sequence[str]] = None) -> TextDataset:
    """``<root>/<split>.tsv`` of a ``tsv`` folder; ``classes`` (from the training file) maps the labels.

    ``classes`` ``None``: the sorted distinct labels of this file (the training file).
    """
    path = os.path.join(root, f"{split}.tsv")
    rows = _read_rows(path, "a tsv folder (DATASET.TYPE tsv) holds train.tsv and dev.tsv (optionally test.tsv) with a "
                            "header row naming the columns sentence, label and optionally sentence2; set DATASET.ROOT "
                            "to that folder")
    header = [h.strip() for h in rows[0]] if rows else []
    if "sentence" not in header or "label" not in header:
        raise DatasetError(f"'{path}': the header row must name the columns sentence and label (optionally "
                           f"sentence2), it has {header}")
    cols = [header.index("sentence")] + ([header.index("sentence2")] if "sentence2" in header else [])
    label_col = header.index("label")
    raw, labels = [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DatasetError(f"'{path}' line {line} has {len(row)} tab-separated fields, the header has "
                               f"{len(header)} (a tab inside a text, or a missing field?)")
        raw.append(tuple(row[c] for c in cols))
        labels.append(row[label_col].strip())
    if not labels:
        raise DatasetError(f"'{path}' holds no examples")
    if classes is None:
        classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DatasetError(f"'{path}' has label(s) {', '.join(unknown[:5])} that train.tsv does not have; every label "
                           "must occur in train.tsv")
    return TextDataset(raw, [index[label] for label in labels], classes, path)


def _glue_task(cfg) -> str:
    name = str(cfg.DATASET.GLUE.TASK).strip().lower()
    if name not in GLUE_TASKS:
        raise ConfigError(f"DATASET.GLUE.TASK is '{cfg.DATASET.GLUE.TASK}'; use one of {', '.join(GLUE_TASKS)}")
    return name


def build_glue(cfg):
    """``(train, test = dev, num_classes, folder)`` of GLUE task ``DATASET.GLUE.TASK``."""
    name = _glue_task(cfg)
    root = os.path.expanduser(str(cfg.DATASET.ROOT) or DEFAULT_GLUE_ROOT)
    train, test = read_glue(root, name, "train"), read_glue(root, name, "dev")
    return train, test, len(GLUE_TASKS[name].labels), os.path.join(root, GLUE_TASKS[name].folder)


def build_tsv(cfg):
    """``(train, test, num_classes, folder)``, plus the validation set when ``test.tsv`` exists."""
    if not str(cfg.DATASET.ROOT):
        raise ConfigError("DATASET.TYPE tsv needs DATASET.ROOT: the folder holding train.tsv and dev.tsv "
                          "(optionally test.tsv)")
    root = os.path.expanduser(str(cfg.DATASET.ROOT))
    train = read_tsv_folder(root, "train")
    dev = read_tsv_folder(root, "dev", train.classes)
    if not os.path.isfile(os.path.join(root, "test.tsv")):
        return train, dev, len(train.classes), root
    if int(cfg.DATASET.VAL_SPLIT):
        raise ConfigError(f"DATASET.VAL_SPLIT is {cfg.DATASET.VAL_SPLIT} but '{root}' has test.tsv, so dev.tsv is "
                          "the validation split already; set DATASET.VAL_SPLIT 0")
    return train, read_tsv_folder(root, "test", train.classes), len(train.classes), root, dev


def metric_names(cfg) -> Tuple[str, ...]:
    """The metrics of ``cfg``'s text data (names of :data:`mdistiller_blockkd.utils.metrics.METRICS`);
    the first one selects the best epoch. ``tsv``: accuracy."""
    if str(cfg.DATASET.TYPE).strip().lower() == "glue":
        return GLUE_TASKS[_glue_task(cfg)].metrics
    return ("acc",)


class TextCollator:
    """``collate_fn`` of text loaders: tokenise a list of items, pad to the longest, pack.

    Returns ``(batch (B, 3, L) int64, labels (B,) int64)``. Sentence pairs are tokenised as
    pairs (segment ids 0 and 1); sequences longer than ``max_length`` tokens are cut
    (the longer sentence of a pair first). Picklable, so loader workers can use it.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def __call__(self, batch):
        texts, labels = zip(*batch)
        first = [t[0] for t in texts]
        second = [t[1] for t in texts] if len(texts[0]) > 1 else None
        enc = self.tokenizer(first, second, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        packed = pack_text_batch(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
        return packed, torch.tensor(labels, dtype=torch.long)
