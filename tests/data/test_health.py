"""DataHealth: drops and fallbacks summed over a run (across DataLoader workers) and over DP replicas (real gloo
processes), on a fault-injected copy of real tiny-corpus cuts."""
from collections import Counter
from types import SimpleNamespace

from lhotse import CutSet
from lhotse.utils import fastcopy

from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.health import DataHealth
from nemo_jstip.data.nemo_types import build_dataloader
from nemo_jstip.parallel.dist import spawn


def faulty_copy(corpus, tmp):
    """general_train, shortest first, with cut 0's audio missing and cut 1's alignment naming another word."""
    cuts = sorted(CutSet.from_file(corpus / "general_train_cuts.jsonl"), key=lambda c: c.duration)
    rec = cuts[0].recording
    cuts[0] = fastcopy(cuts[0], recording=fastcopy(rec, sources=[fastcopy(rec.sources[0], source=str(tmp / "gone.flac"))]))
    sup = cuts[1].supervisions[0]
    words = list(sup.alignment["word"])
    words[0] = words[0]._replace(symbol="zebra")
    cuts[1] = fastcopy(cuts[1], supervisions=[fastcopy(sup, alignment={"word": words})])
    path = tmp / "cuts.jsonl"
    CutSet(cuts).to_file(path)
    return path, [c.id for c in cuts]


def test_counts_over_an_epoch_across_workers(tiny_corpus, tmp_path, jstip_tokenizer):
    path, ids = faulty_copy(tiny_corpus, tmp_path)
    cfg = {"input_cfg": [{"type": "jstip_cuts", "cuts_path": str(path), "kind": "asr", "name": "asr_src"},
                         {"type": "jstip_cuts", "cuts_path": str(path), "kind": "interleaved", "name": "inter_src"}],
           "sampler": {"max_tokens": 600, "max_item_cost": 95, "num_buckets": 1, "shuffle": False},
           "loader": {"num_workers": 2}}
    loader = build_dataloader(cfg, jstip_tokenizer, FrameSpec())
    health, built = DataHealth(every=1), Counter()
    for batch in loader:
        health.update(batch)
        built.update(batch["kinds"])
    sampler = loader.sampler
    too_long = sampler.problems["too_long"]
    totals = health.totals(sampler, ["asr_src", "inter_src"])
    p = totals["problems"]
    assert not {ids[0], ids[1]} & set(sampler.dropped)  # short cuts: not too long
    assert p["missing_audio"] == 2 and p["alignment_mismatch"] == 1  # missing in both streams; one interleaved
    assert p["too_long"] == too_long > 0
    assert totals["examples"] == Counter({k: built[k] for k in ("asr", "interleaved")})
    assert totals["by_source"]["inter_src"]["alignment_mismatch"] == p["alignment_mismatch"]
    scalars = health.scalars(totals)
    assert scalars["data/too_long"] == too_long and scalars["data/examples_text"] == 0
    fallback = p["alignment_mismatch"] / (p["alignment_mismatch"] + built["interleaved"])
    assert scalars["data/interleaved_fallback_share"] == fallback
    line = health.summary(totals, 12)
    assert line.startswith(f"data health after 12 steps: {sum(built.values())} examples")
    assert f"too_long {too_long}" in line and "per source: " in line


def _rank(counts: dict, sampler_counts: dict):
    import torch.distributed as dist

    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(tp=1)  # 2 processes: DP = 2
    health = DataHealth(every=2)
    rank = dist.get_rank()
    for _ in range(rank + 1):  # rank r consumed r + 1 batches
        health.update({"problems": counts, "problems_by_source": {"s": counts},
                       "token_stats": {"asr": 3, "interleaved": 2}})
    sampler = SimpleNamespace(problems=Counter(sampler_counts), problems_by_source={"s": Counter(sampler_counts)},
                              streams=[SimpleNamespace(name="s")])
    assert health.report(3, sampler) == {}  # not a reporting step: no collective
    return health.report(4, sampler)


def test_report_sums_over_data_parallel_ranks():
    a, b = spawn(_rank, 2, {"alignment_mismatch": 2, "missing_audio": 1}, {"too_long": 5}, timeout_s=120)
    assert a == b
    assert a["data/alignment_mismatch"] == 6 and a["data/missing_audio"] == 3  # 1 + 2 batches
    assert a["data/too_long"] == 5  # the sampler's counts are global already: not summed over ranks
    assert a["data/examples_asr"] == 9 and a["data/examples_interleaved"] == 6
    assert a["data/interleaved_fallback_share"] == 6 / 12 and a["data/s/too_long"] == 5 and a["data/s/missing_audio"] == 3
    assert a["data/dropped_share"] == (3 + 5) / (3 + 5 + 15)
