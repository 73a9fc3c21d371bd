"""Data path speed and padding on the embedded corpus: sampler + JSTIPDataset (+ DataLoader workers).

    python benchmarks/bench_data.py [corpus_dir=/tmp/c] [batches=all] [max_tokens=4096] [num_buckets=16]

Builds the default corpus into ``corpus_dir`` if it is missing (``python -m nemo_jstip.prep.corpus``). The mixture
is general_train as ASR (0.4) and as interleaved (0.4) plus medical + banking domain text (0.2, repeated); the
tokenizer is a byte-level BPE trained on the corpus text (``prep.tokenizer.train_tokenizer``; offline stand-in for an LLM's).
Prints three tables:

1. per-batch time of each stage, in one process: drawing a batch from the sampler (incl. ``cost_fn``; averaged
   over the epoch, whose first batch fills the bucketing buffer), the layout (``dataset[items]`` with
   ``load_audio=False``: examples, padding, gather indices) and audio loading + decoding (two passes);
2. batches/s through a ``DataLoader`` with and without audio loading, 0 and 2 workers (worker start-up excluded);
   the same batches as in 1 (the first ``batches`` of epoch 0, default all of it);
3. padding share over one epoch (real lengths from the dataset), with and without bucketing, with the ASR-bound
   and the exact interleaved cost, and packed (``sampler.pack``: several examples per row of 512 positions).
"""
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from lhotse import CutSet

from nemo_jstip.data.dataset import DatasetConfig, JSTIPDataset, make_cost_fn
from nemo_jstip.data.examples import ExampleBuilder, add_special_tokens
from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.interleave import InterleaveConfig
from nemo_jstip.data.sampler import InterleavingSampler, Stream
from nemo_jstip.prep.tokenizer import train_tokenizer


def setup(corpus: Path):
    if not (corpus / ".complete").exists():
        subprocess.run([sys.executable, "-m", "nemo_jstip.prep.corpus", f"out_dir={corpus}"], check=True)
    cuts = CutSet.from_file(corpus / "general_train_cuts.jsonl").to_eager()
    texts = [ln for f in ("medical_text.txt", "banking_text.txt") for ln in (corpus / f).read_text().splitlines()]
    tokenizer = train_tokenizer([c.supervisions[0].text for c in cuts] + texts)
    add_special_tokens(tokenizer, InterleaveConfig())
    return cuts, texts, ExampleBuilder(tokenizer, FrameSpec(), InterleaveConfig())


def make_sampler(cuts, texts, builder, max_tokens, num_buckets, exact=True, epoch=0, pack=False):
    streams = [Stream(cuts, "asr", 0.4), Stream(cuts, "interleaved", 0.4), Stream(texts, "text", 0.2, repeat=True)]
    cost = make_cost_fn(builder, exact=exact)
    s = InterleavingSampler(streams, cost, max_tokens=max_tokens, max_item_cost=512, num_buckets=num_buckets, seed=0,
                            pack=pack)
    cost.follow(s)
    s.set_epoch(epoch)
    return s


def main(corpus_dir="/tmp/c", batches="all", max_tokens="4096", num_buckets="16"):
    max_tokens, num_buckets = int(max_tokens), int(num_buckets)
    cuts, texts, builder = setup(Path(corpus_dir))

    # 1. stages, one process
    sampler = make_sampler(cuts, texts, builder, max_tokens, num_buckets)
    t = time.perf_counter()
    items = list(islice(sampler, None if batches == "all" else int(batches)))
    n = len(items)
    t_sample = (time.perf_counter() - t) / n
    print(f"corpus {corpus_dir}: {len(cuts)} cuts + {len(texts)} text lines; max_tokens={max_tokens}, "
          f"max_item_cost=512, num_buckets={num_buckets}; {n} batches (epoch 0) per measurement\n")
    layout = JSTIPDataset(builder, DatasetConfig(load_audio=False))
    full = JSTIPDataset(builder, DatasetConfig())
    t = time.perf_counter()
    outs = [layout[b] for b in items]
    t_layout = (time.perf_counter() - t) / n
    t_full = []
    for _ in range(2):  # the first pass may read the FLACs from disk, the second from the page cache
        t = time.perf_counter()
        for b in items:
            full[b]
        t_full.append((time.perf_counter() - t) / n)
    size = sum(len(o["kinds"]) for o in outs) / n
    L = sum(o["input_ids"].shape[1] for o in outs) / n
    print("| stage (one process) | ms / batch | ms / item |")
    print("|---|---|---|")
    for name, sec in [("sampler: draw a batch (incl. cost_fn, exact)", t_sample),
                      ("layout only (dataset, load_audio=False)", t_layout),
                      ("audio loading, first pass (full dataset minus layout)", t_full[0] - t_layout),
                      ("audio loading, second pass (page cache warm)", t_full[1] - t_layout),
                      ("full dataset (layout + audio), second pass", t_full[1])]:
        print(f"| {name} | {sec * 1e3:.2f} | {sec * 1e3 / size:.3f} |")
    print(f"\nmean batch: {size:.1f} examples, L = {L:.0f}\n")

    # 2. DataLoader throughput
    print("| DataLoader | workers | batches/s | items/s |")
    print("|---|---|---|---|")
    for load_audio in (False, True):
        for workers in (0, 2):
            dataset = JSTIPDataset(builder, DatasetConfig(load_audio=load_audio))
            s = make_sampler(cuts, texts, builder, max_tokens, num_buckets)
            loader = torch.utils.data.DataLoader(dataset, sampler=s, batch_size=None, num_workers=workers,
                                                 collate_fn=lambda x: x, **({"prefetch_factor": 4} if workers else {}))
            stream = iter(loader)
            next(stream)  # worker start-up excluded
            t = time.perf_counter()
            got = list(islice(stream, n - 1))
            dt = time.perf_counter() - t
            kind = "with audio" if load_audio else "layout only"
            print(f"| {kind} | {workers} | {len(got) / dt:.1f} | {sum(len(b['kinds']) for b in got) / dt:.0f} |")
            del stream

    # 3. padding over one epoch
    print("\n| buckets | interleaved cost | batches | mean size | real tokens (sampler cost) | real tokens (dataset) |")
    print("|---|---|---|---|---|---|")
    for buckets, exact, pack in [(1, False, False), (1, True, False), (num_buckets, False, False),
                                 (num_buckets, True, False), ("packed", True, True)]:
        s = make_sampler(cuts, texts, builder, max_tokens, 1 if pack else buckets, exact=exact, pack=pack)
        real = padded = items_ = nb = 0
        for b in s:
            o = layout[b]
            real, padded = real + o["token_stats"]["real_tokens"], padded + o["token_stats"]["padded_tokens"]
            items_, nb = items_ + len(b), nb + 1
        print(f"| {buckets} | {'exact' if exact else 'ASR bound'} | {nb} | {items_ / nb:.1f} | "
              f"{1 - s.padding_share:.1%} | {real / padded:.1%} |")

if __name__ == "__main__":
    main(**dict(a.split("=", 1) for a in sys.argv[1:]))
