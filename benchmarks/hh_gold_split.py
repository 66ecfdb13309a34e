"""Split human preference pairs for the gold-reward-model protocol (Gao et al. 2022, arXiv:2210.10760):

    python benchmarks/hh_gold_split.py ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz OUT_DIR [--gold 0.6]

One seeded shuffle (random.Random(0)) of the valid pairs, cut into three disjoint files in OUT_DIR:
- gold.jsonl: the first --gold share of the pairs, to fit the gold reward model on (`preftune reward-model`);
- study.jsonl: the pairs the study's label budgets are drawn from (`preftune study --data`);
- held_out.jsonl: --held-out prompts (one {"prompt": ...} a line) the study measures on (`--eval-data`).
Pairs are written with their prompt split off (preftune's reading of implicit-prompt pairs), invalid ones left out
(as --skip-invalid). Prints the counts as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def split(pairs: list, gold_share: float, held_out: int, seed: int = 0) -> tuple[list, list, list]:
    """(gold pairs, study pairs, held-out pairs): a seeded shuffle cut at gold_share, the last `held_out` pairs
    of the rest held out."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    cut = int(len(pairs) * gold_share)
    rest = order[cut:]
    if held_out >= len(rest):
        raise SystemExit(f"--held-out {held_out}: only {len(rest)} pairs are left after the gold share")
    return ([pairs[i] for i in order[:cut]], [pairs[i] for i in rest[:-held_out]],
            [pairs[i] for i in rest[-held_out:]])


def main() -> None:
    from preftune.data.read import load_pairs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="labelled pairs (any form preftune reads)")
    parser.add_argument("out", type=Path, help="folder for gold.jsonl, study.jsonl and held_out.jsonl")
    parser.add_argument("--gold", type=float, default=0.6, help="share of the pairs for the gold reward model")
    parser.add_argument("--held-out", type=int, default=128, help="held-out prompts for the study")
    args = parser.parse_args()
    pairs = load_pairs(args.data, skip_invalid=True).pairs
    gold, study, held_out = split(pairs, args.gold, args.held_out)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in (("gold", [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in gold]),
                          ("study", [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in study]),
                          ("held_out", [{"prompt": p.prompt} for p in held_out])):
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(json.dumps({"pairs": len(pairs), "gold": len(gold), "study": len(study), "held_out": len(held_out)}))


if __name__ == "__main__":
    main()
