"""The data health of a training run: bad-input drops and fallbacks summed over the run, for the logs.

The dataset reports each batch's events in ``batch["problems"]`` / ``batch["problems_by_source"]`` (it runs in the
DataLoader workers, so its own ``stats`` are per worker); the training step hands each consumed batch to
``DataHealth.update``. Every ``every`` steps ``DataHealth.report`` sums the counts over the data-parallel replicas
(one all-reduce of a small integer vector; the TP / PP / CP ranks of a replica see the same batches and are not
summed) and adds the sampler's own drops (``too_long``: every rank's sampler draws every rank's items, so its counts
are already global). It returns scalars to log and, every ``summary_every`` reports, logs one summary line such as

    data health after 2000 steps: 151,230 examples (asr 60,512, interleaved 60,301, text 30,417); dropped 9
    (missing_audio 2, too_long 7); built as ASR instead of interleaved 1,204 = 2.0% of interleaved
    (alignment_mismatch 1,190, alignment_order 14); per source: interleaved1 alignment_mismatch 1,190, ...
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from nemo.utils import logging

from nemo_jstip.data.dataset import PROBLEMS
from nemo_jstip.data.sampler import KINDS

__all__ = ["DataHealth"]

CODES = tuple(PROBLEMS)
FALLBACKS = tuple(c for c, (_, action) in PROBLEMS.items() if action == "built as ASR")
DROPS = tuple(c for c, (_, action) in PROBLEMS.items() if action.startswith("dropped"))


def _dp_group():
    """Megatron's data-parallel group (without CP: CP ranks share a batch), None without one."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return None
    return ps.get_data_parallel_group() if ps.model_parallel_is_initialized() else None


class DataHealth:
    """Per-kind counts of drops and fallbacks over a run; see the module docstring."""

    def __init__(self, every: int = 50, summary_every: int = 10):
        self.every, self.summary_every = max(1, int(every)), max(1, int(summary_every))
        self.problems: Counter = Counter()  # this rank's consumed batches
        self.by_source: dict[str, Counter] = {}
        self.examples: Counter = Counter()  # examples built, per kind (a fallback counts as asr)
        self.reports = 0

    def update(self, batch: dict) -> None:
        self.problems.update(batch.get("problems") or {})
        for source, counts in (batch.get("problems_by_source") or {}).items():
            self.by_source.setdefault(source, Counter()).update(counts)
        stats = batch.get("token_stats") or {}
        self.examples.update({k: int(stats[k]) for k in KINDS if stats.get(k)})

    def totals(self, sampler=None, sources: list[str] = ()) -> dict:
        """Counts summed over the DP replicas plus the sampler's: ``problems``, ``examples``, ``by_source``."""
        sources = sorted(set(sources) | set(self.by_source) | set(getattr(sampler, "problems_by_source", {})))
        keys = [("p", c) for c in CODES] + [("e", k) for k in KINDS] + [(s, c) for s in sources for c in CODES]
        local = {("p", c): self.problems[c] for c in CODES} | {("e", k): self.examples[k] for k in KINDS}
        local |= {(s, c): self.by_source.get(s, Counter())[c] for s in sources for c in CODES}
        values = torch.tensor([local[k] for k in keys], dtype=torch.int64)
        group = _dp_group()
        if group is not None and dist.get_world_size(group) > 1:
            if dist.get_backend(group) == "nccl":
                values = values.cuda()
            dist.all_reduce(values, group=group)
        summed = dict(zip(keys, values.tolist()))
        problems = Counter({c: summed[("p", c)] for c in CODES}) + Counter(getattr(sampler, "problems", {}))
        by_source = {s: Counter({c: summed[(s, c)] for c in CODES}) for s in sources}
        for s, counts in getattr(sampler, "problems_by_source", {}).items():
            by_source[s] += counts
        return {"problems": problems, "examples": Counter({k: summed[("e", k)] for k in KINDS}),
                "by_source": {s: +c for s, c in by_source.items() if +c}}

    def scalars(self, totals: dict) -> dict[str, float]:
        """What the training step logs: ``data/<code>`` per problem seen, examples per kind, the shares dropped and
        fallen back to ASR, and ``data/<source>/<code>``."""
        p, e = totals["problems"], totals["examples"]
        fallbacks, drops = sum(p[c] for c in FALLBACKS), sum(p[c] for c in DROPS)
        out = {f"data/{c}": float(n) for c, n in p.items() if n}
        out |= {f"data/examples_{k}": float(e[k]) for k in KINDS}
        out["data/dropped_share"] = drops / max(drops + sum(e.values()), 1)
        out["data/interleaved_fallback_share"] = fallbacks / max(fallbacks + e["interleaved"], 1)
        out |= {f"data/{s}/{c}": float(n) for s, counts in totals["by_source"].items() for c, n in counts.items()}
        return out

    def summary(self, totals: dict, step: int) -> str:
        p, e = totals["problems"], totals["examples"]

        def listed(codes):
            return ", ".join(f"{c} {p[c]:,}" for c in codes if p[c])

        drops, fallbacks = sum(p[c] for c in DROPS), sum(p[c] for c in FALLBACKS)
        line = (f"data health after {step} steps: {sum(e.values()):,} examples "
                f"({', '.join(f'{k} {e[k]:,}' for k in KINDS)}); dropped {drops:,}")
        line += f" ({listed(DROPS)})" if drops else ""
        share = fallbacks / max(fallbacks + e["interleaved"], 1)
        line += f"; built as ASR instead of interleaved {fallbacks:,} = {100 * share:.1f}% of interleaved"
        line += f" ({listed(FALLBACKS)})" if fallbacks else ""
        if others := [c for c in CODES if p[c] and c not in DROPS + FALLBACKS]:
            line += f"; other: {listed(others)}"
        if totals["by_source"]:
            line += "; per source: " + ", ".join(f"{s} {c} {n:,}" for s, counts in sorted(totals["by_source"].items())
                                                 for c, n in sorted(counts.items()))
        return line

    def report(self, step: int, sampler=None) -> dict[str, float]:
        """Every ``every`` steps (all ranks call it at the same steps: it is a collective): the scalars to log,
        and every ``summary_every`` reports the summary line (NeMo's logger, INFO, as the trainer's own lines). Else {}."""
        if step % self.every:
            return {}
        totals = self.totals(sampler, [s.name for s in getattr(sampler, "streams", [])])
        if self.reports % self.summary_every == 0:
            logging.info(self.summary(totals, step))
        self.reports += 1
        return self.scalars(totals)
