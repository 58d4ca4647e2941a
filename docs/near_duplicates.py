"""Near-duplicate audit of held-out documents against an index: the share whose nearest
indexed neighbour is a near-exact copy (at least 80% of word 5-grams shared, as Jaccard of
the two sets: ``retriever.is_near_duplicate``, the rule of ``exclude_duplicates``), for the
seeded test sample the runs score and for the whole test split. With ``--experts-log`` (the
per-document log of a run with ``experts=``), instead: how many scored documents had experts
trained on a near-duplicate of them (experts train offline, so the filter retrieval applies
cannot).

Usage: python docs/near_duplicates.py CORPUS.test.jsonl --index INDEX [--sample 16 --seed 0
                                      --min-chars 500 --max-chars 10000] [--experts DIR --experts-log LOG.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from index_server.index import open_index
from lm_eval_ttt.documents import ROLLING, args_key
from lm_eval_ttt.experts import ExpertsManifest
from lm_eval_ttt.retriever import Retriever, is_near_duplicate
from lm_eval_ttt.runlog import read_log
from lm_eval_ttt.settings import NeighbourSettings
from lm_eval_ttt.task_data import seeded_sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", type=Path)
    p.add_argument("--index", required=True)
    p.add_argument("--sample", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-chars", type=int, default=500)
    p.add_argument("--max-chars", type=int, default=10000)
    p.add_argument("--experts", type=Path, help="experts directory of the run --experts-log logged")
    p.add_argument("--experts-log", type=Path, help="per-document log (.jsonl) of a run with experts=")
    args = p.parse_args()
    texts = [json.loads(line)["text"] for line in open(args.corpus, encoding="utf-8") if line.strip()]
    sample = seeded_sample(len(texts), lambda positions: [texts[i] for i in positions], args.sample, args.seed,
                           args.min_chars, args.max_chars)
    if args.experts_log:
        index = open_index(args.index)
        experts_audit(args.experts, args.experts_log, [t for _, t in sample], index)
        return
    retriever = Retriever.open(NeighbourSettings(index=args.index))
    retriever.prefetch(texts, 1, progress=True)
    duplicated = [is_near_duplicate(t, retriever.neighbours(t, 1).texts[0]) for t in texts]
    in_sample = [duplicated[i] for i, _ in sample]
    print("held-out documents whose nearest indexed neighbour is a near-duplicate (>= 80% of word 5-grams, Jaccard):")
    print(f"  the {len(sample)} scored test documents: {sum(in_sample)} ({sum(in_sample) / len(sample):.1%})")
    print(f"  the whole test split: {sum(duplicated)} of {len(texts)} ({sum(duplicated) / len(texts):.1%})")


def experts_audit(experts: Path, log: Path, sample: list[str], index) -> None:
    manifest = ExpertsManifest.read(experts)
    records = read_log(log.parent / log.name.split(".rank")[0])
    hits, pairs = 0, 0
    for text in sample:
        record = records[args_key(ROLLING, [[text], 0])]
        trained = [i for c in record["experts"] for i in manifest.experts[c].docs]
        copies = sum(is_near_duplicate(text, t) for t in index.texts(trained))
        hits, pairs = hits + bool(copies), pairs + copies
    print(f"scored documents whose experts trained on a near-duplicate of them: {hits} of {len(sample)} "
          f"({pairs} near-duplicate training documents in all)")


if __name__ == "__main__":
    main()
