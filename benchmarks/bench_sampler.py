"""InterleavingSampler speed, padding share and restore (replay) cost on synthetic metadata.

    python benchmarks/bench_sampler.py [num_cuts]

Prints one row per bucket count: batches and items per second over one epoch (metadata only, one process),
padding share, mean batch size, and the time load_state_dict takes to replay to the middle of the epoch.
"""
import random
import sys
import time

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


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
