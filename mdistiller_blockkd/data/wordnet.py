"""A real text-classification set that installs offline: WordNet noun glosses -> supersense.

Debian's ``wordnet-base`` puts WordNet 3.0 in ``/usr/share/wordnet/``. Each synset line of
``data.noun`` reads (after a license header whose lines start with two spaces)::

    offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [pointers] | gloss

``lex_filenum`` 03-28 are the 26 noun supersenses in WordNet's lexnames order
(:data:`NOUN_SUPERSENSES`; the package does not ship the ``lexnames`` file itself),
``w_cnt`` is two hexadecimal digits, words use ``_`` for spaces. The task: from a gloss
(definition and examples), predict the supersense.

The text is the gloss **without the lemma words**: every word token equal (ignoring
case) to a word of one of the synset's lemmas (``physical_entity`` -> physical, entity),
or to its plural (+s, +es, y -> ies), is removed, so the examples do not name the
answer's synset ("dog: a member of the genus Canis...; the dog barked all night" keeps
no "dog"). Texts left empty, and texts that occur in more than one synset, are dropped.

:func:`make_wordnet_set` writes a class-balanced, seeded ``tsv`` folder
(``DATASET.TYPE tsv``): from every supersense with at least ``per_class`` usable glosses
it draws ``per_class`` of them (numpy ``default_rng(seed)``), ``test`` for
``test.tsv``, ``dev`` for ``dev.tsv`` and the rest for ``train.tsv``; classes with
fewer are dropped and named (with the defaults, 300 per class: ``noun.Tops`` with 51
synsets and ``noun.motive`` with 42; 24 classes remain). Columns: ``sentence``,
``label`` (the supersense name, e.g. ``noun.animal``). A ``README.md`` records the
source, the choices and the counts.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections import Counter
from typing import Dict, List, NamedTuple, Sequence

import numpy as np

from ..errors import DatasetError, UserError
from ..utils.fileio import atomic_write_text

__all__ = ["NOUN_SUPERSENSES", "DEFAULT_DATA_NOUN", "Synset", "read_noun_synsets", "gloss_without_lemmas",
           "make_wordnet_set"]

DEFAULT_DATA_NOUN = "/usr/share/wordnet/data.noun"

#: Lexicographer file number -> noun supersense (WordNet's lexnames order).
NOUN_SUPERSENSES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute", 8: "noun.body",
    9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling", 13: "noun.food",
    14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object", 18: "noun.person",
    19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession", 22: "noun.process", 23: "noun.quantity",
    24: "noun.relation", 25: "noun.shape", 26: "noun.state", 27: "noun.substance", 28: "noun.time",
}

_WORD = re.compile(r"[A-Za-z0-9']+")


class Synset(NamedTuple):
    """One noun synset: its offset, supersense name, lemmas (``_`` for spaces) and gloss."""

    offset: str
    supersense: str
    lemmas: tuple
    gloss: str


def read_noun_synsets(path: str = DEFAULT_DATA_NOUN) -> List[Synset]:
    """Every synset of a WordNet ``data.noun`` file (license header skipped); a malformed line is a DatasetError."""
    if not os.path.isfile(path):
        raise DatasetError(f"'{path}' not found; install Debian's wordnet-base (apt-get install wordnet-base) or give "
                           "the data.noun of a WordNet 3.0 database with --source")
    synsets = []
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            for number, line in enumerate(f, start=1):
                if line.startswith("  ") or not line.strip():
                    continue
                head, bar, gloss = line.partition("|")
                fields = head.split()
                try:
                    if not bar or len(fields) < 6 or fields[2] != "n":
                        raise ValueError
                    filenum, count = int(fields[1]), int(fields[3], 16)
                    lemmas = tuple(fields[4:4 + 2 * count:2])
                    if filenum not in NOUN_SUPERSENSES or len(lemmas) != count or count < 1:
                        raise ValueError
                except ValueError:
                    raise DatasetError(f"'{path}' line {number} is not a WordNet noun synset line "
                                       "(offset lex_filenum n w_cnt word lex_id ... | gloss)") from None
                synsets.append(Synset(fields[0], NOUN_SUPERSENSES[filenum], lemmas, gloss.strip()))
    except UnicodeDecodeError as e:
        raise DatasetError(f"'{path}' is not a WordNet data file ({e})") from None
    except OSError as e:
        raise DatasetError(f"could not read '{path}': {e}") from None
    if not synsets:
        raise DatasetError(f"'{path}' holds no synset lines; is it WordNet's data.noun?")
    return synsets


def _forms(word: str) -> set:
    forms = {word, word + "s", word + "es"}
    if word.endswith("y"):
        forms.add(word[:-1] + "ies")
    return forms


def gloss_without_lemmas(gloss: str, lemmas: Sequence[str]) -> str:
    """``gloss`` with every word token of ``lemmas`` (or its plural) removed; whitespace collapsed."""
    banned = set()
    for lemma in lemmas:
        for word in re.split(r"[_\-\s]+", lemma.lower()):
            if word:
                banned |= _forms(word)
    text = _WORD.sub(lambda m: "" if m.group(0).lower() in banned else m.group(0), gloss)
    return " ".join(text.split())


def _readme(source, seed, per_class, dev, test, kept, dropped, counts, duplicates, empty) -> str:
    rows = "\n".join(f"| {name} | {counts[name]} |" for name in kept)
    dropped_text = ", ".join(f"{name} ({counts[name]} usable glosses)" for name in dropped) or "none"
    return f"""\
# WordNet noun supersenses (gloss -> supersense)

A text-classification set made by `python -m mdistiller_blockkd make-wordnet-set --per-class {per_class} \\
--dev {dev} --test {test} --seed {seed}` from `{source}` (WordNet 3.0, Princeton University; see WordNet's
license at the top of that file).

- text (`sentence`): the synset's gloss (definition and examples) with every word of its lemmas, and their
  plurals, removed (so the text does not name the synset); label: the noun supersense (lexicographer file).
- {len(kept)} classes, {per_class} glosses each: train {per_class - dev - test}, dev {dev}, test {test} per class
  (drawn with numpy default_rng({seed})).
- dropped classes (fewer than {per_class} usable glosses): {dropped_text}.
- glosses dropped before drawing: {empty} empty once the lemma words are removed, {duplicates} whose text
  occurs in more than one synset.

Use: `DATASET.TYPE tsv DATASET.ROOT <this folder>` (dev.tsv is the validation split, test.tsv the test set).

| class | usable glosses |
|---|---|
{rows}
"""


def make_wordnet_set(out: str, source: str = DEFAULT_DATA_NOUN, per_class: int = 300, dev: int = 50,
                     test: int = 50, seed: int = 0, overwrite: bool = False) -> Dict[str, object]:
    """Write ``train.tsv``, ``dev.tsv``, ``test.tsv`` and ``README.md`` into ``out`` (see the module docstring).

    Returns ``{"classes": [...], "dropped": {name: usable count}, "sizes": {split: examples},
    "duplicates": n, "empty": n}``. Bad arguments, an existing set without ``overwrite``
    and OS errors raise :class:`UserError`.
    """
    if dev < 1 or test < 1 or per_class < dev + test + 1:
        raise UserError(f"--per-class {per_class}, --dev {dev}, --test {test}: use --dev and --test >= 1 and "
                        "--per-class > dev + test (the rest trains)")
    names = ("train.tsv", "dev.tsv", "test.tsv")
    present = [n for n in names if os.path.exists(os.path.join(out, n))]
    if present and not overwrite:
        raise UserError(f"'{out}' already holds {', '.join(present)}; choose another --out or pass --overwrite")
    synsets = read_noun_synsets(source)
    texts = [gloss_without_lemmas(s.gloss, s.lemmas) for s in synsets]
    seen = Counter(texts)
    empty = sum(1 for t in texts if not t)
    duplicates = sum(1 for t in texts if t and seen[t] > 1)
    pools: Dict[str, List[str]] = {name: [] for name in NOUN_SUPERSENSES.values()}
    for s, t in zip(synsets, texts):
        if t and seen[t] == 1:
            pools[s.supersense].append(t)
    counts = {name: len(pool) for name, pool in pools.items()}
    kept = [name for name in NOUN_SUPERSENSES.values() if counts[name] >= per_class]
    dropped = [name for name in NOUN_SUPERSENSES.values() if counts[name] < per_class]
    if len(kept) < 2:
        raise UserError(f"only {len(kept)} supersense(s) have {per_class} usable glosses in '{source}'; lower --per-class")
    rng = np.random.default_rng(seed)
    rows: Dict[str, List[str]] = {n: [] for n in names}
    for name in kept:
        chosen = [pools[name][i] for i in rng.permutation(len(pools[name]))[:per_class]]
        parts = {"test.tsv": chosen[:test], "dev.tsv": chosen[test:test + dev], "train.tsv": chosen[test + dev:]}
        for split, items in parts.items():
            rows[split] += [f"{text}\t{name}" for text in items]
    try:
        os.makedirs(out, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".wordnet-set-", dir=out)
        try:
            for split in names:
                lines = [rows[split][i] for i in rng.permutation(len(rows[split]))]
                atomic_write_text(os.path.join(stage, split), "sentence\tlabel\n" + "\n".join(lines) + "\n")
            atomic_write_text(os.path.join(stage, "README.md"),
                              _readme(source, seed, per_class, dev, test, kept, dropped, counts, duplicates, empty))
            for name in (*names, "README.md"):
                os.replace(os.path.join(stage, name), os.path.join(out, name))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    except OSError as e:
        raise UserError(f"could not write the set into '{out}': {e.strerror or e}") from None
    return {"classes": kept, "dropped": {name: counts[name] for name in dropped},
            "sizes": {split[:-4]: len(rows[split]) for split in names}, "duplicates": duplicates, "empty": empty}
