"""Where a domain's word errors sit: in a few derailed utterances or spread thinly (JSTIP's general-WER gap).

    .venv/bin/python benchmarks/error_bursts.py --out nemo_experiments/repro_6k --seeds 2,3,4,5 \
        --systems jstip_word@6k_asr15,joint@6k [--domain general] [--min-errors 4] [--splits dev,test]

Reads each run's ``eval_SPLIT/hypotheses.jsonl`` (``benchmarks/reproduce.py``'s run folders; ``SYSTEM@TAG`` as there)
and prints, mean ± std over seeds: the domain's word errors, the utterances with at least ``--min-errors`` errors
("bursts": the decoder left the audio), the errors inside them and the errors elsewhere. Two systems with the same
WER can differ here: one misrecognises words everywhere, the other derails on a handful of utterances.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import mean_std, parse_seeds, run_name  # noqa: E402


def utterance_errors(rows: list[dict]) -> list[int]:
    """Word errors (substitutions + deletions + insertions) of each row's hypothesis against its reference."""
    from nemo_jstip.metrics import wer

    out = []
    for r in rows:
        w = wer([r["reference"]], [r["hypothesis"] or ""])
        out.append(round(w["wer"] * w["words"]))
    return out


def bursts(errors: list[int], min_errors: int) -> dict:
    """Totals over one run: all errors, utterances with ``>= min_errors``, the errors in them and elsewhere."""
    big = [e for e in errors if e >= min_errors]
    return {"errors": sum(errors), "bursts": len(big), "in_bursts": sum(big), "elsewhere": sum(errors) - sum(big)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=parse_seeds, required=True)
    ap.add_argument("--systems", required=True, help="comma list of SYSTEM@TAG (or SYSTEM: no tag)")
    ap.add_argument("--domain", default="general")
    ap.add_argument("--min-errors", type=int, default=4)
    ap.add_argument("--splits", default="dev,test")
    args = ap.parse_args(argv)
    keys = ("errors", "bursts", "in_bursts", "elsewhere")
    print(f"| split | system | seeds | {args.domain} utterances | word errors | utterances with >= {args.min_errors} "
          "| errors in them | errors elsewhere |\n|---|---|---|---|---|---|---|---|")
    for split in args.splits.split(","):
        for system in args.systems.split(","):
            runs = []
            for seed in args.seeds:
                f = args.out / run_name(system, seed) / f"eval_{split}" / "hypotheses.jsonl"
                if f.exists():
                    rows = [r for line in f.read_text().splitlines() if line.strip()
                            and (r := json.loads(line))["domain"] == args.domain]
                    runs.append((len(rows), bursts(utterance_errors(rows), args.min_errors)))
            if not runs:
                continue
            cells = [mean_std([b[k] for _, b in runs], scale=1.0) for k in keys]
            print(f"| {split} | {system} | {len(runs)} | {runs[0][0]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
