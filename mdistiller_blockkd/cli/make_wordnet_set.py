"""Write the WordNet text-classification set (gloss -> noun supersense) as a ``tsv`` folder.

Reads Debian's ``wordnet-base`` (``/usr/share/wordnet/data.noun``: WordNet 3.0), removes
the lemma words from every gloss, drops supersenses with fewer than ``--per-class``
usable glosses (with the defaults noun.Tops and noun.motive) and writes a class-balanced,
seeded ``train.tsv`` / ``dev.tsv`` / ``test.tsv`` plus ``README.md`` (see
:mod:`mdistiller_blockkd.data.wordnet`). Train on it with
``DATASET.TYPE tsv DATASET.ROOT <out>`` (docs/nlp.md).

    python -m mdistiller_blockkd make-wordnet-set --out data/wordnet_supersense
    python -m mdistiller_blockkd make-wordnet-set --out /tmp/wn --per-class 200 --dev 40 --test 40 --seed 1
"""

from __future__ import annotations

import argparse
import sys

from ..data.wordnet import DEFAULT_DATA_NOUN, make_wordnet_set
from ..errors import run_cli


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (DATASET.ROOT of the runs)")
    parser.add_argument("--source", default=DEFAULT_DATA_NOUN, help="WordNet's data.noun (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=300,
                        help="glosses per class, all splits together; smaller classes are dropped (default: %(default)s)")
    parser.add_argument("--dev", type=int, default=50, help="dev (validation) glosses per class (default: %(default)s)")
    parser.add_argument("--test", type=int, default=50, help="test glosses per class (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw and the file order (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace the set already in --out")
    args = parser.parse_args(argv)
    summary = make_wordnet_set(args.out, args.source, args.per_class, args.dev, args.test, args.seed, args.overwrite)
    sizes = summary["sizes"]
    print(f"wrote {args.out}: train {sizes['train']}, dev {sizes['dev']}, test {sizes['test']} examples, "
          f"{len(summary['classes'])} classes x {args.per_class}")
    dropped = ", ".join(f"{name} ({n} usable)" for name, n in summary["dropped"].items()) or "none"
    print(f"dropped classes (fewer than {args.per_class} usable glosses): {dropped}")
    print(f"glosses dropped before the draw: {summary['empty']} empty without their lemma words, "
          f"{summary['duplicates']} occurring in more than one synset")


def cli(argv=None) -> int:
    """Console-script entry point: :func:`main` with one ``error:`` line for a user error."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
