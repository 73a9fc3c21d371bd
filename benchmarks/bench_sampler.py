"""InterleavingSampler speed, padding share and restore cost on synthetic metadata.

    python benchmarks/bench_sampler.py [num_cuts]             # speed and padding per bucket count (in memory)
    python benchmarks/bench_sampler.py resume [num_cuts]      # resume at mid-epoch from JSONL files (1,000,000)

The first prints one row per bucket count: batches and items per second over one epoch (metadata only, one
process), padding share, mean batch size, and the time load_state_dict takes to resume in the middle of the epoch.
``resume`` writes a JSONL manifest of ``num_cuts`` synthetic cuts and a text file, draws half an epoch of the
mixture asr 0.4 / interleaved 0.4 (the same manifest) / text 0.2, then times: ``state_dict`` (and its pickled size),
``load_state_dict`` at the same DP size (seeks to the stored byte offsets, rebuilds the buffered items), and, for
comparison, the replay a restore at another DP size does (every batch of the epoch up to there, as every restore
did before positions were stored).
"""
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from lhotse import CutSet, MonoCut, SupervisionSegment

from nemo_jstip.data.sampler import InterleavingSampler, Stream, item_kind


def make_cuts(n: int, seed: int = 0) -> CutSet:
    rng = random.Random(seed)
    cuts = []
    for i in range(n):
        dur = round(rng.uniform(0.5, 20.0), 2)
        text = " ".join("w" for _ in range(max(1, int(dur * 2.5))))
        sup = SupervisionSegment(f"s{i}", f"r{i}", 0.0, dur, text=text)
        cuts.append(MonoCut(f"c{i}", 0.0, dur, 0, supervisions=[sup]))
    return CutSet(cuts)


def cost_fn(item) -> int:
    if item_kind(item) == "text":
        return len(item.text.split()) + 2
    return int(item.duration * 12.5) + len(item.supervisions[0].text.split()) + 2


def main(num_cuts: int = 20000) -> None:
    cuts = make_cuts(num_cuts)
    rng = random.Random(1)
    texts = [" ".join("t" for _ in range(rng.randint(3, 60))) for _ in range(num_cuts // 2)]
    streams = [Stream(cuts, "asr", 0.4), Stream(cuts, "interleaved", 0.4), Stream(texts, "text", 0.2, repeat=True)]
    opts = dict(max_tokens=16384, max_item_cost=400, buffer_size=10000, num_items_for_edges_estimate=5000)
    print(f"{num_cuts} cuts, max_tokens={opts['max_tokens']}, max_item_cost={opts['max_item_cost']}")
    print(f"{'buckets':>7} {'batches':>7} {'batch/s':>8} {'items/s':>8} {'padding':>7} {'mean bs':>7} {'replay':>12}")
    for num_buckets in (1, 4, 8, 16, 32):
        s = InterleavingSampler(streams, cost_fn, num_buckets=num_buckets, **opts)
        t = time.perf_counter()
        batches = list(s)
        dt = time.perf_counter() - t
        items = sum(len(b) for b in batches)
        half = len(batches) // 2
        s2 = InterleavingSampler(streams, cost_fn, num_buckets=num_buckets, **opts)
        for _ in zip(range(half), s2):
            pass
        state = s2.state_dict()
        t = time.perf_counter()
        InterleavingSampler(streams, cost_fn, num_buckets=num_buckets, **opts).load_state_dict(state)
        replay = time.perf_counter() - t
        print(f"{num_buckets:>7} {len(batches):>7} {len(batches) / dt:>8.0f} {items / dt:>8.0f} "
              f"{s.padding_share:>7.3f} {items / len(batches):>7.1f} {replay:>6.2f}s/{half:<5}")


def write_corpus(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` MonoCut lines (as ``make_cuts``, streamed: no CutSet in memory) and ``n // 2`` text lines."""
    rng = random.Random(seed)
    cuts, text = folder / "cuts.jsonl", folder / "text.txt"
    with open(cuts, "w") as f:
        for i in range(n):
            dur = round(rng.uniform(0.5, 20.0), 2)
            sup = {"id": f"s{i}", "recording_id": f"r{i}", "start": 0.0, "duration": dur,
                   "text": " ".join("w" for _ in range(max(1, int(dur * 2.5))))}
            f.write(json.dumps({"id": f"c{i}", "start": 0.0, "duration": dur, "channel": 0, "supervisions": [sup],
                                "type": "MonoCut"}) + "\n")
    with open(text, "w") as f:
        f.writelines(" ".join("t" for _ in range(rng.randint(3, 60))) + "\n" for _ in range(n // 2))
    return cuts, text


def resume(num_cuts: int = 1_000_000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cuts, text = write_corpus(Path(tmp), num_cuts)
        print(f"{num_cuts} cuts written in {time.perf_counter() - t:.0f} s")
        streams = [Stream(str(cuts), "asr", 0.4), Stream(str(cuts), "interleaved", 0.4),
                   Stream(str(text), "text", 0.2, repeat=True)]
        opts = dict(max_tokens=16384, max_item_cost=400, num_buckets=16, buffer_size=10000, shuffle_buffer_size=10000,
                    num_items_for_edges_estimate=5000)
        s = InterleavingSampler(streams, cost_fn, **opts)
        t, items, batches = time.perf_counter(), 0, 0
        for batch in s:  # half an epoch: one stream of the cut pair runs out after about num_cuts / 0.4 items
            items, batches = items + len(batch), batches + 1
            if items >= num_cuts * 1.25:
                break
        draw = time.perf_counter() - t
        print(f"drew {batches} batches ({items} items) in {draw:.1f} s ({items / draw:.0f} items/s)")
        t = time.perf_counter()
        state = s.state_dict()
        buf = io.BytesIO()
        torch.save(state, buf)
        print(f"state_dict + torch.save: {time.perf_counter() - t:.2f} s, {buf.tell() / 2**20:.1f} MiB")
        nxt = [it.id for it in next(s)]
        t = time.perf_counter()
        restored = InterleavingSampler(streams, cost_fn, **opts)
        built = time.perf_counter() - t
        t = time.perf_counter()
        restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
        load = time.perf_counter() - t
        assert [it.id for it in next(restored)] == nxt
        print(f"resume (same DP size): construct {built:.2f} s (bucket edges from 5000 items), "
              f"load_state_dict {load:.2f} s; next batch identical")
        t = time.perf_counter()
        InterleavingSampler(streams, cost_fn, **opts, dp_world_size=2).load_state_dict(state)
        print(f"replay (a restore at another DP size): {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["resume"]:
        resume(*(int(a) for a in sys.argv[2:]))
    else:
        main(*(int(a) for a in sys.argv[1:]))
