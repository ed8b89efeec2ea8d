"""Synthesise the demo corpus: speech from espeak-ng and flite, no downloads.

    python -m jobs.demo_corpus --output demo_data/corpus --minutes 15
    python -m jobs.demo_corpus --output demo_data/multi --minutes 15 --languages en,de,fr,es,it
    python -m jobs.demo_corpus --output demo_data/semi --minutes 15 --labelled-fraction 0.2
    python -m jobs.prepare --input demo_data/corpus --output demo_data/shards --preset tiny data.shard_size_mb=2

Writes wav files, ``transcripts.tsv`` (id, path, transcript, speaker, and with
``--languages`` language; ``jobs.prepare`` reads it by itself) and ``speakers.tsv``
(which voices are held out). English by default; ``--languages`` adds German, French,
Spanish and Italian (espeak-ng voices, built-in sentences). ``--labelled-fraction F``
keeps the transcripts of only that share of the training speakers' utterances (the
rest are left empty: unlabelled, for ``data.labelled_ratio``); held-out speakers keep
all of theirs. Details in ``pipeline/data/demo_corpus.py``.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.data.demo_corpus import LANGUAGES, make_corpus, parse_languages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo_corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="directory to write the corpus into")
    parser.add_argument("--minutes", type=float, default=15.0, help="minutes of speech (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sentences, voices and rates (default: %(default)s)")
    parser.add_argument("--languages", default="",
                        help=f"comma-separated languages of {','.join(LANGUAGES)} for a multilingual corpus "
                             "(default: English only, without a language column)")
    parser.add_argument("--labelled-fraction", type=float, default=1.0,
                        help="share of the training speakers' utterances that keep their transcript, chosen by a "
                             "seeded hash of the id; held-out speakers keep all (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        languages = parse_languages(args.languages) if args.languages else None
        stats = make_corpus(args.output, minutes=args.minutes, seed=args.seed, languages=languages,
                            labelled_fraction=args.labelled_fraction)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"demo corpus: {stats['utterances']} utterances, {stats['minutes']:.1f} min, "
          f"{stats['speakers']} speakers, {stats['languages']} languages, {stats['labelled']} with a transcript "
          f"in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
