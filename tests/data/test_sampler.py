"""InterleavingSampler: mixture weights, kinds, token budget, bucketing, DP split, exact resume, config."""
import random
from collections import Counter
from itertools import islice

import pytest
import torch
from lhotse import CutSet, MonoCut, SupervisionSegment
from lhotse.supervision import AlignmentItem
from lhotse.testing.dummies import dummy_recording
from omegaconf import OmegaConf

from nemo_jstip.data.sampler import InterleavingSampler, Stream, build_sampler, item_cost, item_kind, pack_rows

MAX_TOKENS, MAX_ITEM = 1000, 160


def make_cut(i: int, rng: random.Random) -> MonoCut:
    dur = round(rng.uniform(0.5, 10.0), 2)
    words = [f"w{rng.randrange(50)}" for _ in range(max(1, int(dur * 2.5)))]
    step = dur / len(words)
    sup = SupervisionSegment(
        id=f"sup-{i}", recording_id=f"dummy-recording-{i:04d}", start=0.0, duration=dur, text=" ".join(words),
        alignment={"word": [AlignmentItem(w, k * step, step) for k, w in enumerate(words)]},
        custom={"domain": "medical", "entities": []},
    )
    return MonoCut(f"cut-{i}", 0.0, dur, 0, recording=dummy_recording(i, duration=dur), supervisions=[sup])


@pytest.fixture(scope="module")
def cuts() -> CutSet:
    rng = random.Random(0)
    return CutSet([make_cut(i, rng) for i in range(300)])


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(1)
    return [" ".join(f"t{rng.randrange(50)}" for _ in range(rng.randint(3, 40))) for _ in range(200)]


def cost_fn(item) -> int:
    if item_kind(item) == "text":
        return len(item.text.split())
    return int(item.duration * 12.5) + len(item.supervisions[0].text.split())


def sampler(streams, **kw) -> InterleavingSampler:
    opts = dict(max_tokens=MAX_TOKENS, max_item_cost=MAX_ITEM, num_buckets=8, buffer_size=300,
                num_items_for_edges_estimate=500, shuffle_buffer_size=200, seed=3)
    return InterleavingSampler(streams, cost_fn, **{**opts, **kw})


def keys(batch) -> list[str]:
    return [f"{item_kind(it)}|{it.id}" for it in batch]


def test_mixing_follows_weights(cuts, texts):
    weights = {"asr": 0.5, "interleaved": 0.3, "text": 0.2}
    s = sampler([Stream(cuts if k != "text" else texts, k, w, repeat=True) for k, w in weights.items()])
    counts = Counter(item_kind(it) for batch in islice(s, 800) for it in batch)
    total = sum(counts.values())
    assert total > 8000
    for kind, w in weights.items():
        assert abs(counts[kind] / total - w) < 0.03, (kind, counts)


def test_same_cut_feeds_asr_and_interleaved_without_mutation(cuts):
    s = sampler([Stream(cuts, "asr", 1.0), Stream(cuts, "interleaved", 1.0)])
    items = [it for batch in s for it in batch]
    kinds_by_id = {}
    for it in items:
        kinds_by_id.setdefault(it.id, set()).add(item_kind(it))
        assert item_cost(it) == cost_fn(it)
    assert sum(kinds == {"asr", "interleaved"} for kinds in kinds_by_id.values()) > 100
    assert all(c.custom is None for c in cuts)  # sources untouched: items carry kind/cost in their own dict
    asr = next(it for it in items if item_kind(it) == "asr")
    inter = next(it for it in items if it.id == asr.id and item_kind(it) == "interleaved")
    assert asr is not inter and asr.supervisions[0] is inter.supervisions[0]  # shallow copies of one cut


@pytest.mark.parametrize("num_buckets,max_batch_size", [(8, None), (1, None), (8, 12)])
def test_token_budget_includes_padding_and_is_never_exceeded(cuts, texts, num_buckets, max_batch_size):
    streams = [Stream(cuts, "asr", 0.6), Stream(texts, "text", 0.4, repeat=True)]
    for rank in range(2):  # DP=2 also exercises the split of the last, incomplete step
        s = sampler(streams, num_buckets=num_buckets, max_batch_size=max_batch_size, dp_rank=rank, dp_world_size=2)
        batches = list(s)
        for b in batches:
            costs = [item_cost(it) for it in b]
            assert b.padded_tokens == len(b) * max(costs) <= MAX_TOKENS
            assert max_batch_size is None or len(b) <= max_batch_size
        fill = sum(b.padded_tokens for b in batches[:-1]) / (MAX_TOKENS * (len(batches) - 1))
        assert fill > 0.6  # the budget is used, not met trivially


def test_bucketing_cuts_padding(cuts, texts):
    streams = [Stream(cuts, "asr", 0.5), Stream(cuts, "interleaved", 0.3), Stream(texts, "text", 0.2, repeat=True)]
    bucketed, flat = sampler(streams, num_buckets=12), sampler(streams, num_buckets=1)
    for s in (bucketed, flat):
        batches = list(s)
        assert s.padding_share == pytest.approx(1 - sum(b.real_tokens for b in batches) / sum(b.padded_tokens for b in batches))
    assert bucketed.padding_share < 0.15
    assert bucketed.padding_share < 0.4 * flat.padding_share


def test_dp_ranks_get_disjoint_batches_that_cover_the_data(cuts, texts):
    streams = [Stream(cuts, "asr", 0.5), Stream(cuts, "interleaved", 0.3), Stream(texts, "text", 0.2)]
    whole = Counter(k for b in sampler(streams) for k in keys(b))
    per_rank = [[keys(b) for b in sampler(streams, dp_rank=r, dp_world_size=3)] for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1  # same number of steps on every rank
    assert sum((Counter(k for b in batches for k in b) for batches in per_rank), Counter()) == whole
    for r in range(3):
        assert not {tuple(b) for b in per_rank[r]} & {tuple(b) for q in range(3) if q != r for b in per_rank[q]}
    # every TP/PP rank of a DP replica builds its own sampler with the same dp_rank: identical batches
    assert [keys(b) for b in sampler(streams, dp_rank=1, dp_world_size=3)] == per_rank[1]


def test_epochs_are_deterministic_and_differ(cuts, texts):
    streams = [Stream(cuts, "asr", 0.7), Stream(texts, "text", 0.3, repeat=True)]
    a, b = sampler(streams), sampler(streams)
    epoch0 = [keys(x) for x in a]
    assert epoch0 == [keys(x) for x in b]
    a.set_epoch(1)
    assert a.state_dict()["consumed"] == 0  # a checkpoint between epochs starts the new one from its beginning
    epoch1 = [keys(x) for x in a]
    assert epoch1 != epoch0 and epoch0 == [keys(x) for x in b]  # b still in epoch 0: replays it
    assert Counter(k for x in epoch1 for k in x if k.startswith("asr")) == Counter(
        k for x in epoch0 for k in x if k.startswith("asr"))  # same ASR pass, new order


def test_resume_mid_epoch_in_process(cuts, texts):
    streams = [Stream(cuts, "asr", 0.5), Stream(cuts, "interleaved", 0.3), Stream(texts, "text", 0.2, repeat=True)]
    reference = sampler(streams, dp_rank=1, dp_world_size=2)
    reference.set_epoch(2)
    full = [keys(b) for b in reference]
    interrupted = sampler(streams, dp_rank=1, dp_world_size=2)
    interrupted.set_epoch(2)
    head = [keys(b) for b in islice(interrupted, 9)]
    state = interrupted.state_dict()
    assert state["consumed"] == 9 and head == full[:9]
    resumed = sampler(streams, dp_rank=1, dp_world_size=2)
    resumed.load_state_dict(state)
    assert [keys(b) for b in resumed] == full[9:]
    with pytest.raises(ValueError, match="config differs"):
        sampler(streams, max_tokens=2000, dp_rank=1, dp_world_size=2).load_state_dict(state)


class EchoDataset(torch.utils.data.Dataset):
    """Stands in for the real dataset: turns the item list into output, echoing the batch position."""

    def __getitem__(self, batch):
        return {"keys": keys(batch), "position": batch.position}


def loader(s: InterleavingSampler):
    return torch.utils.data.DataLoader(EchoDataset(), sampler=s, batch_size=None, num_workers=2, prefetch_factor=2)


def test_resume_through_prefetching_dataloader(cuts, texts):
    streams = [Stream(cuts, "asr", 0.5, repeat=True), Stream(cuts, "interleaved", 0.3, repeat=True),
               Stream(texts, "text", 0.2, repeat=True)]
    total, cut_at = 20, 7
    full = [keys(b) for b in islice(sampler(streams), total)]

    s = sampler(streams)
    it = iter(loader(s))
    for _ in range(cut_at):
        batch = next(it)
        s.mark_consumed(batch["position"])  # the training step is done with this batch
    state = s.state_dict()
    assert s.batches_yielded > cut_at  # the workers prefetched: counting yielded batches would skip some
    assert state["consumed"] == cut_at
    del it

    resumed = sampler(streams)
    resumed.load_state_dict(state)
    got = [b["keys"] for b in islice(loader(resumed), total - cut_at)]
    assert got == full[cut_at:]


def test_build_from_yaml_config(tmp_path, cuts, texts):
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    (tmp_path / "domain.txt").write_text("\n".join(texts) + "\n")
    cfg = OmegaConf.create(f"""
        streams:
          - {{source: {tmp_path}/cuts.jsonl.gz, kind: asr, weight: 0.4}}
          - {{source: {tmp_path}/cuts.jsonl.gz, kind: interleaved, weight: 0.4}}
          - {{source: {tmp_path}/domain.txt, kind: text, weight: 0.2, repeat: true, name: domain}}
        max_tokens: {MAX_TOKENS}
        max_item_cost: {MAX_ITEM}
        num_buckets: 4
        buffer_size: 300
        seed: 5
    """)
    s = build_sampler(cfg, cost_fn, dp_rank=0, dp_world_size=1)
    batches = [keys(b) for b in s]
    assert {k.split("|")[0] for b in batches for k in b} == {"asr", "interleaved", "text"}
    assert any(k.startswith("text|domain:") for b in batches for k in b)
    assert batches == [keys(b) for b in build_sampler(cfg, cost_fn)]
    with pytest.raises(TypeError):
        build_sampler({**OmegaConf.to_container(cfg), "max_tokenz": 5}, cost_fn)


def test_resume_at_another_data_parallel_size(cuts, texts):
    """A checkpoint taken at DP=1 resumes at DP=2 (and that one at DP=1 again): over the epoch every item is
    trained on exactly as often as in an uninterrupted DP=1 epoch, none repeated or skipped."""
    streams = [Stream(cuts, "asr", 0.6), Stream(cuts, "interleaved", 0.4)]
    epoch = Counter(k for b in sampler(streams) for k in keys(b))
    one = sampler(streams)
    seen = Counter(k for b in islice(one, 5) for k in keys(b))
    two = [sampler(streams, dp_rank=r, dp_world_size=2) for r in range(2)]
    for s in two:
        s.load_state_dict(one.state_dict())
    for s in two:
        seen.update(k for b in islice(s, 3) for k in keys(b))
    back = sampler(streams)
    back.load_state_dict(two[1].state_dict())
    seen.update(k for b in back for k in keys(b))
    assert seen == epoch and max(epoch.values()) == 1


def test_too_long_items_are_counted_and_named(cuts, texts, caplog):
    limit = 100
    s = sampler([Stream(cuts, "asr", 1.0, name="long_cuts"), Stream(texts, "text", 0.5, repeat=True)],
                num_buckets=1, max_item_cost=limit)
    too_long = {c.id for c in cuts if int(c.duration * 12.5) + len(c.supervisions[0].text.split()) > limit}
    assert 10 < len(too_long) < len(cuts)
    with caplog.at_level("WARNING", logger="nemo_jstip.data.sampler"):
        drawn = {it.id for batch in s for it in batch}
    assert not drawn & too_long
    assert s.problems == {"too_long": len(too_long)} and s.problems_by_source == {"long_cuts": {"too_long": len(too_long)}}
    assert set(s.dropped) == too_long
    assert all(f"> sampler.max_item_cost={limit}" in why and why.startswith("too_long: asr item of ")
               for why in s.dropped.values())
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 10 and "further ones are only counted" in logged[-1]
    assert all("[too_long]" in m and f"max_item_cost={limit}" in m for m in logged)


def test_resume_continues_from_the_stored_position_without_replaying(tmp_path, cuts, texts):
    """File sources: the restore seeks to the checkpoint's byte offsets and rebuilds the buffered items from the
    state; no item before them is read or costed again. A checkpoint right after a restore works too."""
    cuts.to_file(tmp_path / "cuts.jsonl")
    (tmp_path / "text.txt").write_text("\n".join(texts) + "\n")
    streams = [Stream(str(tmp_path / "cuts.jsonl"), "asr", 0.5), Stream(str(tmp_path / "cuts.jsonl"), "interleaved", 0.3),
               Stream(str(tmp_path / "text.txt"), "text", 0.2, repeat=True)]
    opts = dict(shuffle_buffer_size=20, buffer_size=40)
    full = [keys(b) for b in sampler(streams, **opts)]
    first = sampler(streams, **opts)
    head = [keys(b) for b in islice(first, 30)]
    state = torch.load(_saved(first.state_dict(), tmp_path), weights_only=True)  # plain data only
    calls = []

    def counting(item):
        calls.append(item.id)
        return cost_fn(item)

    resumed = sampler(streams, **opts)
    resumed.cost_fn = counting
    resumed.load_state_dict(state)
    assert calls == []  # nothing re-read or re-costed
    again = sampler(streams, **opts)
    again.load_state_dict(resumed.state_dict())  # saved before drawing anything
    rest = [keys(b) for b in resumed]
    assert head + rest == full and [keys(b) for b in again] == rest
    assert len(calls) < sum(len(b) for b in rest) + 3 * 20 + 40  # the rest of the epoch (plus what was buffered)


def _saved(state, tmp_path):
    torch.save(state, tmp_path / "state.pt")
    return tmp_path / "state.pt"


def test_packing_fills_rows_and_covers_the_epoch(cuts, texts):
    streams = [Stream(cuts, "asr", 0.5), Stream(cuts, "interleaved", 0.3), Stream(texts, "text", 0.2)]
    whole = Counter(k for b in sampler(streams) for k in keys(b))
    packed = sampler(streams, pack=True)
    batches = list(packed)
    assert Counter(k for b in batches for k in keys(b)) == whole  # the same items, once each
    rows_per_batch = MAX_TOKENS // MAX_ITEM
    for b in batches:
        rows = pack_rows([item_cost(it) for it in b], MAX_ITEM)
        fills = Counter()
        for r, it in zip(rows, b):
            fills[r] += item_cost(it)
        assert max(rows) < rows_per_batch and max(fills.values()) <= MAX_ITEM and b.pack_length == MAX_ITEM
        assert b.padded_tokens == len(fills) * max(fills.values())
    bucketed = sampler(streams, num_buckets=12)
    list(bucketed)
    full = batches[:-3]  # the epoch's last batches get what is left
    # rows of 160 tokens for items of 7-135: the recipes' rows of 1024-2048 fill better (benchmarks/bench_data.py)
    assert sum(b.real_tokens for b in full) / sum(b.padded_tokens for b in full) > 0.97 > 1 - bucketed.padding_share


def test_packed_resume_and_data_parallel(cuts, texts):
    streams = [Stream(cuts, "asr", 0.6), Stream(texts, "text", 0.4, repeat=True)]
    full = [keys(b) for b in sampler(streams, pack=True, dp_rank=1, dp_world_size=2)]
    interrupted = sampler(streams, pack=True, dp_rank=1, dp_world_size=2)
    head = [keys(b) for b in islice(interrupted, 5)]
    resumed = sampler(streams, pack=True, dp_rank=1, dp_world_size=2)
    resumed.load_state_dict(interrupted.state_dict())
    assert head + [keys(b) for b in resumed] == full
    with pytest.raises(ValueError, match="config differs"):
        sampler(streams, dp_rank=1, dp_world_size=2).load_state_dict(interrupted.state_dict())
