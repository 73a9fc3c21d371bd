"""The JSTIP training mixture (docs/method.md#the-data-mixture) as a Lhotse sampler.

Weighted streams of ASR, interleaved and text-only examples -> batches limited by a token budget that counts
padding, bucketed by cost, split over data-parallel ranks, exactly resumable behind a prefetching DataLoader.

Built on Lhotse's ``CutSampler`` (DP split: every rank draws the same ``world_size`` batches per step and keeps
its own; ``set_epoch``, ``filter``, diagnostics, the base ``state_dict``), ``estimate_duration_buckets`` (bucket
edges) and :class:`PaddedTokenConstraint`, a ``SamplingConstraint`` on ``cost_fn``. The stages between are ours,
written as plain data so that a checkpoint can hold them (``_State``): per stream a pass over its source (its
byte offset for JSONL and text files) through a shuffle buffer, a weighted mixture (one RNG draw per item; the
epoch ends when a non-repeating stream runs out), and ``buffer_size`` items in cost buckets from which each step's
batches are drawn (a bucket holding a full batch for every rank, chosen at random; with ``sync_buckets`` the whole
step comes from that bucket). Lhotse's ``streaming_shuffle``, ``LazyIteratorMultiplexer`` and ``DynamicBucketer``
do the same jobs as generators, whose position cannot be stored.

Items. An ASR or interleaved item is a shallow copy of the source cut (``lhotse.utils.fastcopy``) with a *new*
``custom`` dict holding ``jstip_kind`` and ``jstip_cost``; the source cut, its recording and supervisions are
shared, never written to, so one CutSet can feed an ``asr`` and an ``interleaved`` stream at once. A text item is a
:class:`TextItem` with the same two keys. ``item_kind(item)`` / ``item_cost(item)`` read them.

Where Lhotse's own samplers fall short for this job (measured with lhotse 1.33.0):

* ``DurationBatcher`` adds the item that crosses the limit before it stops, and ``TokenConstraint`` only looks
  ahead with the longest item seen so far, so a batch's padded size can exceed the budget (22 of 142 batches
  of ``DynamicCutSampler(max_duration=30)`` on 0.5-10 s cuts). :class:`PaddedTokenConstraint` instead bounds every
  item by the upper edge of its bucket, which makes ``len(batch) * max_cost <= max_tokens`` hold always.
* ``CutSampler.__next__`` fills the last, incomplete DP round by concatenating and re-splitting batches, which can
  put long and short items together past the budget; ours splits batches in halves instead (never costlier).
* ``DynamicCutSampler`` / ``DynamicBucketingSampler.state_dict()`` refuse a custom constraint (NeMo's token-count
  constraint included), and their state counts batches the sampler *yielded*: behind ``DataLoader(num_workers=W,
  prefetch_factor=P)`` that is W*P batches more than the trainer consumed, and a restore skips them silently.
* ``CutSampler.__next__`` writes ``dataloading_info`` into every yielded cut's ``custom``: with an eager CutSet
  that mutates the caller's cuts. Our items are copies, and we do not write it.

Resume. A batch is a :class:`MixedBatch` (a list of items) that knows its ``position`` = (epoch, index within this
rank's epoch). The dataset passes it on in its output, and the training loop calls
``sampler.mark_consumed(position)`` after each step; ``state_dict()`` then stores the pipeline's state as it was
right after the last *consumed* batch (the sampler keeps a snapshot per batch yielded but not yet consumed: list
copies, the items are shared), with how many batches of the epoch's shared stream (all DP ranks' batches) that
is. Before the first ``mark_consumed`` it stores the state after the last batch yielded, which is exact only
without workers. ``load_state_dict`` at the same DP size continues from that state: file sources seek to their
stored byte offsets (any other source skips its items unread by ``cost_fn``), the buffered items come from the
checkpoint (each cut as its JSON line, with its cost), and the RNGs continue, so the next batch is the one an
uninterrupted run would have trained on next, in O(1) of the epoch position (benchmarks/bench_sampler.py
``resume``). At another DP size the batching differs, so it replays the epoch up to there to collect the items
consumed, and the epoch restarts without them (see ``load_state_dict``).

Typical use (the sampler lives in the main process, the dataset turns item lists into tensors in the workers)::

    sampler = build_sampler(cfg.sampler, cost_fn, dp_rank=dp_rank, dp_world_size=dp_size)
    loader = DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=2)
    for batch in loader:                      # dataset returns e.g. {..., "position": items.position}
        train_step(batch)
        sampler.mark_consumed(batch["position"])
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
from collections import Counter
import random
from bisect import bisect_left
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from lhotse import CutSet
from lhotse.dataset.sampling.base import CutSampler, SamplingConstraint
from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets
from lhotse.serialization import deserialize_item, load_manifest_lazy_or_eager
from lhotse.utils import fastcopy
from omegaconf import DictConfig, OmegaConf

from nemo_jstip.data.manifest import ManifestCuts, TextFile, check_text_file

log = logging.getLogger(__name__)

KINDS = ("asr", "interleaved", "text")
KIND_KEY = "jstip_kind"
COST_KEY = "jstip_cost"
STREAM_KEY = "jstip_stream"  # the name of the stream an item came from, for per-source bad-input counts
# the sampler's share of the bad-input table (nemo_jstip.data.dataset.PROBLEMS has the dataset's)
MAX_DROPPED_IDS, MAX_LOGGED = 100_000, 10
MAX_SNAPSHOTS = 32  # pipeline states kept for batches yielded but not yet marked consumed (>= DataLoader prefetch)
PACK_LOOKAHEAD = 64  # packing: buffered items a batch may pass over (fit no row) before it is closed
SAMPLER_PROBLEMS = {"too_long": ("item costlier than sampler.max_item_cost", "dropped by the sampler")}


@dataclass
class TextItem:
    """A text-only example: one sentence. ``id`` is ``<stream name>:<line index>``."""

    id: str
    text: str
    custom: dict = field(default_factory=dict)


def item_kind(item) -> str:
    """``"asr"``, ``"interleaved"`` or ``"text"``."""
    return item.custom[KIND_KEY]


def item_cost(item) -> int:
    """The item's cost in tokens (speech frames + text tokens), as ``cost_fn`` gave it when the item was made."""
    return item.custom[COST_KEY]


@dataclass
class Stream:
    """One input of the mixture. ``source``: a CutSet or a cut manifest path (asr / interleaved), a text file
    path or a re-iterable of strings (text). ``weight``: relative share of examples. ``repeat``: restart (and
    reshuffle) when exhausted; the epoch ends when the first non-repeating stream runs out, and never if all
    repeat."""

    source: Any
    kind: str
    weight: float = 1.0
    repeat: bool = False
    name: str | None = None


@dataclass
class _Pass:
    """One stream's pass over its source: the source position after the last raw item read, raw items read,
    items made, the shuffle buffer and its RNG."""

    rep: int = 0
    position: Any = None
    count: int = 0
    items: int = 0
    done: bool = False
    buf: list = field(default_factory=list)
    rng: random.Random | None = None


@dataclass
class _State:
    """Where the pipeline is in the epoch, as plain data: per-stream passes, the mixture's RNG, the items still to
    exclude (a DP-size change), the buckets and their RNG."""

    streams: list[_Pass]
    mux: random.Random
    left: Counter
    buckets: list[list]
    bucket_rng: random.Random
    buffered: int = 0
    ended: bool = False

    def copy(self) -> "_State":
        """A snapshot: list and RNG copies (items are shared, never mutated)."""
        return _State([replace(p, buf=list(p.buf), rng=_copy_rng(p.rng)) for p in self.streams], _copy_rng(self.mux),
                      Counter(self.left), [list(b) for b in self.buckets], _copy_rng(self.bucket_rng),
                      self.buffered, self.ended)

    def to_dict(self) -> dict:
        return {"streams": [{**{k: getattr(p, k) for k in ("rep", "position", "count", "items", "done")},
                             "buf": [_item_dict(x) for x in p.buf], "rng": _rng_state(p.rng)} for p in self.streams],
                "mux": _rng_state(self.mux), "left": dict(self.left),
                "buckets": [[_item_dict(x) for x in b] for b in self.buckets],
                "bucket_rng": _rng_state(self.bucket_rng), "buffered": self.buffered, "ended": self.ended}

    @classmethod
    def from_dict(cls, d: dict) -> "_State":
        streams = [_Pass(**{k: p[k] for k in ("rep", "position", "count", "items", "done")},
                         buf=[_item_from(x) for x in p["buf"]], rng=_rng_from(p["rng"])) for p in d["streams"]]
        return cls(streams, _rng_from(d["mux"]), Counter(d["left"]), [[_item_from(x) for x in b] for b in d["buckets"]],
                   _rng_from(d["bucket_rng"]), d["buffered"], d["ended"])


def _copy_rng(rng: random.Random) -> random.Random:
    out = random.Random()
    out.setstate(rng.getstate())
    return out


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from(state: list) -> random.Random:
    rng = random.Random()
    rng.setstate((state[0], tuple(state[1]), state[2]))
    return rng


def _item_dict(item) -> dict:
    """Plain data (a torch checkpoint loads it with ``weights_only=True``): a cut as its JSON manifest line."""
    if isinstance(item, TextItem):
        return {"text_item": [item.id, item.text, item.custom]}
    return {"cut": json.dumps(item.to_dict())}


def _item_from(d: dict):
    if "text_item" in d:
        return TextItem(*d["text_item"])
    return deserialize_item(json.loads(d["cut"]))


def _first_fit(fills: list[int], cost: int, length: int) -> int:
    """The first row (of filled ``fills``) with room for ``cost`` in ``length`` tokens, else ``len(fills)``."""
    return next((r for r, f in enumerate(fills) if f + cost <= length), len(fills))


def pack_rows(costs: Sequence[int], length: int) -> list[int]:
    """First fit, in order: the row of each item when items are packed into rows of ``length`` tokens (an item
    longer than ``length`` gets a row of its own). The sampler and the dataset both call it on the same costs, so
    they agree on the rows."""
    fills, rows = [], []
    for c in costs:
        rows.append(r := _first_fit(fills, c, length))
        if r == len(fills):
            fills.append(0)
        fills[r] += c
    return rows


class MixedBatch(list):
    """The items of one batch, plus where it sits in the epoch and its token counts. ``pack_length``: the items
    are packed into rows of that many tokens (``pack_rows``), else each item is a row."""

    def __init__(self, items: Iterable, epoch: int, index: int, pack_length: int | None = None) -> None:
        super().__init__(items)
        self.epoch, self.index, self.pack_length = epoch, index, pack_length
        costs = [item_cost(it) for it in self]
        self.real_tokens = sum(costs)
        if pack_length:
            fills = np.bincount(pack_rows(costs, pack_length), weights=costs)
            self.padded_tokens = len(fills) * int(fills.max())
        else:
            self.padded_tokens = len(costs) * max(costs)

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.index

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens


@dataclass
class PaddedTokenConstraint(SamplingConstraint):
    """Budget on ``batch_size * longest item`` (padding included) and optionally on batch size.

    ``edges`` are ascending upper cost edges of the buckets, the last one being the largest allowed cost. An item
    counts as long as the edge of its bucket, so the batch stops one item early rather than one item late: a
    batch whose items share a bucket (as the sampler builds them) never exceeds
    ``max_tokens``. With one edge (no bucketing) the batch size is ``max_tokens // edges[0]``.
    """

    max_tokens: int
    edges: Sequence[int]
    max_batch_size: int | None = None
    num_items: int = 0
    bound: int = 0

    def add(self, example) -> None:
        self.num_items += 1
        self.bound = max(self.bound, self.edges[bisect_left(self.edges, item_cost(example))])

    def exceeded(self) -> bool:
        too_many = self.max_batch_size is not None and self.num_items > self.max_batch_size
        return too_many or self.num_items * self.bound > self.max_tokens

    def close_to_exceeding(self) -> bool:
        full = self.max_batch_size is not None and self.num_items >= self.max_batch_size
        return full or (self.num_items + 1) * self.bound > self.max_tokens

    def reset(self) -> None:
        self.num_items = self.bound = 0

    def measure_length(self, example) -> int:
        return item_cost(example)


class InterleavingSampler(CutSampler):
    """Mixes weighted asr / interleaved / text streams into token-budget batches for one data-parallel rank.

    :param streams: the mixture.
    :param cost_fn: ``cost_fn(item) -> int``, the item's sequence length in tokens; it may read ``item_kind``.
    :param max_tokens: budget per batch, ``len(batch) * max cost in batch`` (padding counts).
    :param max_batch_size: optional cap on items per batch.
    :param max_item_cost: items above it are dropped (counted in ``diagnostics``); also the bound of the last
        bucket. Defaults to ``max_tokens``; set it to the model's max sequence length.
    :param num_buckets: buckets estimated from the first ``num_items_for_edges_estimate`` items of epoch 0
        (plus one edge at the largest cost seen, plus ``max_item_cost``); 1 turns bucketing off.
    :param pack: pack several items into each row of ``max_item_cost`` tokens instead of one item per padded row:
        a batch is ``max_tokens // max_item_cost`` rows, filled first-fit from the buffer in order (an item that
        fits no row stays buffered for a later batch; the scan stops after ``PACK_LOOKAHEAD`` such items). No
        bucketing (``num_buckets`` and ``bucket_edges`` are ignored): lengths may mix freely in a row. The model
        keeps attention within each item (``segment_ids``, nemo_jstip/data/dataset.py).
    :param bucket_edges: ascending upper cost edges instead of estimating them.
    :param buffer_size: items held across the buckets (also stored in a checkpoint).
    :param shuffle: shuffle each stream through a buffer of ``shuffle_buffer_size`` items (also in a checkpoint).
    :param shuffle_buffer_size: per-stream shuffle buffer.
    :param sync_buckets: the ranks of one step draw from the same bucket (similar lengths, no stragglers).
    :param drop_last: drop partial batches and the last incomplete DP round.
    :param seed: everything is a function of ``(seed, epoch)`` and the config.
    :param dp_rank, dp_world_size: the DATA-parallel rank and size; all TP/PP ranks of one DP replica pass the
        same values and get the same batches. ``torch.distributed`` is never consulted.
    """

    def __init__(
        self,
        streams: Sequence[Stream],
        cost_fn: Callable[[Any], int],
        *,
        max_tokens: int,
        max_batch_size: int | None = None,
        max_item_cost: int | None = None,
        num_buckets: int = 8,
        bucket_edges: Sequence[int] | None = None,
        num_items_for_edges_estimate: int = 5000,
        buffer_size: int = 10000,
        shuffle: bool = True,
        shuffle_buffer_size: int = 10000,
        sync_buckets: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        pack: bool = False,
        dp_rank: int = 0,
        dp_world_size: int = 1,
    ) -> None:
        super().__init__(shuffle=shuffle, drop_last=drop_last, world_size=dp_world_size, rank=dp_rank, seed=seed)
        assert streams, "at least one stream"
        self.streams = [replace(s, name=s.name or f"{s.kind}{i}") for i, s in enumerate(streams)]
        for s in self.streams:
            assert s.kind in KINDS, f"stream {s.name}: kind must be one of {KINDS}, got {s.kind!r}"
            assert s.weight > 0, f"stream {s.name}: weight must be > 0"
        self._sources = [_open_source(s) for s in self.streams]
        self._iters: list[Iterator | None] = [None] * len(self.streams)  # open sources (transient)
        self.cost_fn = cost_fn
        self.max_tokens = max_tokens
        self.max_batch_size = max_batch_size
        self.max_item_cost = max_item_cost or max_tokens
        assert self.max_item_cost <= max_tokens, "max_item_cost must fit in max_tokens"
        self.buffer_size = buffer_size
        self.shuffle_buffer_size = shuffle_buffer_size
        self.sync_buckets = sync_buckets
        self.pack = pack
        if pack:
            edges = []
        elif bucket_edges is not None:
            edges = [int(e) for e in bucket_edges if e < self.max_item_cost]
            assert edges == sorted(set(edges)), "bucket_edges must be strictly ascending"
        elif num_buckets > 1:
            edges = self._estimate_edges(num_buckets, num_items_for_edges_estimate)
        else:
            edges = []
        self.edges = edges + [self.max_item_cost]
        self._state: _State | None = None  # the pipeline's position (None: the epoch has not started)
        self._snapshots: dict[int, _State] = {}  # the state after each yielded batch not yet known consumed
        self._index = 0  # batches yielded to this rank in the current epoch
        self._consumed: int | None = None  # batches consumed in the current epoch, once mark_consumed was used
        # the epoch's position over all DP ranks: batches drawn from the shared stream before batch 0 of this object
        # (a restore), and after each batch it yielded; what makes a resume at another DP size continue in place
        self._skipped, self._drawn_after = 0, {}
        self._excluded: Counter = Counter()  # items consumed at another DP size in this epoch (see load_state_dict)
        self.real_tokens = self.padded_tokens = 0  # totals over the batches yielded by this object
        # items this object's pipeline dropped (every DP rank draws all ranks' items, so each counts them all):
        # code -> count, stream -> code -> count, and the first MAX_DROPPED_IDS item ids -> why
        self.problems: Counter = Counter()
        self.problems_by_source: dict[str, Counter] = {}
        self.dropped: dict[str, str] = {}

    # ---- the pipeline: streams -> shuffle -> mixture -> filter -> buckets -> batches ----
    # Its whole state is plain data (_State: source positions, shuffle buffers, buckets, RNG states), so a
    # checkpoint stores it and a restore continues from it in O(1) of the epoch position.
    def _rng(self, *parts) -> random.Random:
        return random.Random("/".join(map(str, (self.seed, self.epoch) + parts)))

    def _fresh_state(self) -> "_State":
        """The epoch's start (also in the constructor, before the edges and exclusions exist)."""
        return _State(streams=[_Pass(rng=self._rng(s.name, 0)) for s in self.streams], mux=self._rng("mux"),
                      left=Counter(getattr(self, "_excluded", ())),
                      buckets=[[] for _ in getattr(self, "edges", ())], bucket_rng=self._rng("bucket"))

    def _open(self, i: int, position) -> Iterator:
        """``(raw item, position after it)`` of stream ``i``'s source from ``position`` (None: the start)."""
        source = self._sources[i]
        inner = source.data if isinstance(source, CutSet) else source
        if hasattr(inner, "iter_from"):  # ManifestCuts, TextFile, nemo_types' readers: seek to a byte offset
            return inner.iter_from(position)
        n = position or 0  # any other iterable: skip n items (reads them, no cost_fn)
        return ((x, k) for k, x in enumerate(itertools.islice(iter(source), n, None), n + 1))

    def _make_item(self, i: int, x, index: int):
        s = self.streams[i]
        if s.kind == "text":
            if not x or not x.strip():
                return None
            item = TextItem(id=f"{s.name}:{index}", text=x.strip(), custom={KIND_KEY: "text", STREAM_KEY: s.name})
        else:
            item = fastcopy(x, custom={**(x.custom or {}), KIND_KEY: s.kind, STREAM_KEY: s.name})
        item.custom[COST_KEY] = int(self.cost_fn(item))
        return item

    def _stream_next(self, st: "_State", i: int):
        """Stream ``i``'s next item (shuffled through its buffer), None when the stream ends for the epoch."""
        s, p = self.streams[i], st.streams[i]
        size = self.shuffle_buffer_size if self.shuffle else 1
        while True:
            while not p.done and len(p.buf) < size:
                if self._iters[i] is None:
                    self._iters[i] = self._open(i, p.position)
                try:
                    x, p.position = next(self._iters[i])
                except StopIteration:
                    p.done, self._iters[i] = True, None
                    break
                p.count += 1
                if (item := self._make_item(i, x, p.count - 1)) is not None:
                    p.buf.append(item)
                    p.items += 1
            if p.buf:
                k = p.rng.randrange(len(p.buf)) if self.shuffle else 0
                if self.shuffle:  # O(1) removal; the order is random anyway
                    p.buf[k], p.buf[-1] = p.buf[-1], p.buf[k]
                return p.buf.pop(-1 if self.shuffle else 0)
            if not s.repeat or not p.items:
                return None
            p = st.streams[i] = _Pass(rep=p.rep + 1, rng=self._rng(s.name, p.rep + 1))  # the next pass, reshuffled

    def _mix_next(self, st: "_State"):
        """The mixture's next item; None (for good) once a non-repeating stream runs out."""
        if st.ended:
            return None
        n = len(self.streams)
        i = 0 if n == 1 else st.mux.choices(range(n), weights=[s.weight for s in self.streams])[0]
        item = self._stream_next(st, i)
        st.ended = item is None
        return item

    def _mixture(self) -> Iterator:
        """A fresh pass over the mixture (the bucket-edge estimate); the sampler's own state is untouched."""
        saved, self._iters = self._iters, [None] * len(self.streams)
        try:
            st = self._fresh_state()
            while (item := self._mix_next(st)) is not None:
                yield item
        finally:
            self._iters = saved

    def _keep(self, item) -> bool:
        if item_cost(item) <= self.max_item_cost:
            return self._filter_fn(item)
        why = f"{item_kind(item)} item of {item_cost(item)} tokens > sampler.max_item_cost={self.max_item_cost}"
        self.problems["too_long"] += 1
        self.problems_by_source.setdefault(item.custom.get(STREAM_KEY, "?"), Counter())["too_long"] += 1
        if len(self.dropped) < MAX_DROPPED_IDS:
            self.dropped[item.id] = f"too_long: {why}"
        if self.problems["too_long"] <= MAX_LOGGED:
            more = " (further ones are only counted: sampler.problems)" if self.problems["too_long"] == MAX_LOGGED else ""
            log.warning("%s: %s -> dropped [too_long]%s", item.id, why, more)
        return False

    def _estimate_edges(self, num_buckets: int, num_items: int) -> list[int]:
        # from epoch 0's mixture (self.epoch is 0 here), so the edges follow the weights
        sample = [it for it in itertools.islice(self._mixture(), num_items) if item_cost(it) <= self.max_item_cost]
        assert len(sample) >= num_buckets, f"{len(sample)} items are too few to estimate {num_buckets} buckets"
        constraint = PaddedTokenConstraint(self.max_tokens, [self.max_item_cost])
        bins = estimate_duration_buckets(sample, num_buckets=num_buckets, constraint=constraint)
        top = max(item_cost(it) for it in sample)
        return sorted(({int(b) for b in bins} | {top}) - {self.max_item_cost})

    def _fill(self, st: "_State") -> None:
        """Top the buckets up to ``buffer_size`` items from the filtered mixture."""
        while st.buffered < self.buffer_size and (item := self._mix_next(st)) is not None:
            if _take(st.left, _key(item)) or not self._keep(item):
                continue
            st.buckets[bisect_left(self.edges, item_cost(item))].append(item)
            st.buffered += 1

    def _capacity(self, k: int) -> int:
        cap = max(1, self.max_tokens // self.edges[k])
        return min(cap, self.max_batch_size) if self.max_batch_size else cap

    def _full(self, st: "_State", k: int, batches: int) -> bool:
        """Bucket ``k`` holds ``batches`` full batches (packed: enough tokens to fill their rows)."""
        if self.pack:
            return sum(item_cost(it) for it in st.buckets[k]) >= batches * self.max_tokens
        return len(st.buckets[k]) >= batches * self._capacity(k)

    def _take(self, st: "_State", k: int) -> list:
        """The next batch out of bucket ``k``: its first ``_capacity`` items, or packed: first fit into
        ``max_tokens // max_item_cost`` rows, skipping (and keeping) items that fit no row."""
        bucket = st.buckets[k]
        if not self.pack:
            batch = bucket[: self._capacity(k)]
            del bucket[: len(batch)]
            return batch
        n_rows, length = max(1, self.max_tokens // self.max_item_cost), self.max_item_cost
        fills, batch, kept, j = [], [], [], 0
        while j < len(bucket) and len(kept) < PACK_LOOKAHEAD and len(batch) < (self.max_batch_size or len(bucket)):
            it, j = bucket[j], j + 1
            c = item_cost(it)
            r = _first_fit(fills, c, length)
            if r == n_rows:
                kept.append(it)
                continue
            if r == len(fills):
                fills.append(0)
            fills[r] += c
            batch.append(it)
        bucket[:j] = kept
        return batch

    def _choose_bucket(self, st: "_State", batches: int) -> int | None:
        """A bucket holding ``batches`` full batches, else one full batch, else (the epoch's end) any items."""
        self._fill(st)
        for need in (batches, 1):
            ready = [k for k in range(len(st.buckets)) if self._full(st, k, need)]
            if ready:
                return ready[st.bucket_rng.randrange(len(ready))] if len(ready) > 1 else ready[0]
        if self.drop_last:
            return None
        left = [k for k, b in enumerate(st.buckets) if b]
        return left[st.bucket_rng.randrange(len(left))] if len(left) > 1 else (left[0] if left else None)

    def _draw_step(self, st: "_State") -> list[list]:
        """The shared step: up to ``world_size`` batches (every rank draws them all and keeps its own); with
        ``sync_buckets`` from one bucket while it lasts."""
        batches, k = [], None
        for _ in range(self.world_size):
            if k is None or not self.sync_buckets or not self._full(st, k, 1):
                k = self._choose_bucket(st, self.world_size - len(batches) if self.sync_buckets else 1)
            if k is None:
                break
            batches.append(self._take(st, k))
            st.buffered -= len(batches[-1])
        return batches

    def __iter__(self) -> "InterleavingSampler":
        if self._just_restored_state:
            return self
        self.diagnostics.reset_current_epoch()
        self._index, self._consumed = 0, (0 if self._consumed is not None else None)
        self._skipped, self._drawn_after, self._snapshots = 0, {}, {}
        self._iters = [None] * len(self.streams)
        self._state = self._fresh_state()
        return self

    def __next__(self) -> MixedBatch:
        self.allow_iter_to_reset_state()
        if self._state is None:
            iter(self)
        batches = self._draw_step(self._state)
        if not batches or (len(batches) < self.world_size and self.drop_last):
            raise StopIteration
        batch = MixedBatch(_spread(batches, self.world_size)[self.rank], self.epoch, self._index,
                           self.max_item_cost if self.pack else None)
        self._drawn_after[self._index] = self._drawn(self._index) + len(batches)
        self._snapshots[self._index] = self._state.copy()
        if self._consumed is None:  # before mark_consumed is used: keep the last few (the DataLoader prefetches)
            self._snapshots.pop(self._index - MAX_SNAPSHOTS, None)
        self._index += 1
        self.diagnostics.keep(batch)
        self.real_tokens += batch.real_tokens
        self.padded_tokens += batch.padded_tokens
        return batch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # counters belong to an epoch; state_dict() may come before the next iter()
            self._index, self._consumed = 0, (None if self._consumed is None else 0)
            self._skipped, self._drawn_after, self._excluded, self._snapshots = 0, {}, Counter(), {}
            self._state = None
        super().set_epoch(epoch)

    def map(self, fn):
        raise NotImplementedError("transform items in the dataset; the sampler yields MixedBatch lists")

    # ---- diagnostics ----
    @property
    def padding_share(self) -> float:
        """1 - real / padded tokens over all batches this object yielded (replays after a restore excluded)."""
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def batches_yielded(self) -> int:
        return self._index

    @property
    def batches_consumed(self) -> int:
        """What ``state_dict`` stores: marked consumption, or batches yielded before any ``mark_consumed``."""
        return self._index if self._consumed is None else self._consumed

    # ---- exact resume ----
    def mark_consumed(self, position: Sequence[int]) -> None:
        """The trainer has consumed the batch at ``position`` = ``(epoch, index)`` (``MixedBatch.position``)."""
        epoch, index = (int(p) for p in position)
        if epoch != self.epoch or index >= self._index:
            raise ValueError(f"batch {position} was not yielded in epoch {self.epoch} ({self._index} so far)")
        self._consumed = index + 1
        for i in [i for i in self._drawn_after if i < index]:  # only the consumed point is needed later
            del self._drawn_after[i]
        for i in [i for i in self._snapshots if i < index]:
            del self._snapshots[i]

    def _drawn(self, consumed: int) -> int:
        """Batches drawn from the shared stream (all DP ranks) once this rank's first ``consumed`` are done."""
        return self._drawn_after[consumed - 1] if consumed else self._skipped

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        consumed = self.batches_consumed
        snapshot = self._snapshots.get(consumed - 1)  # -1: the state a restore started from (None at epoch start)
        if snapshot is None and self._drawn(consumed):
            raise ValueError(f"no pipeline state for batch {consumed - 1}: mark_consumed lags more than "
                             f"{MAX_SNAPSHOTS} batches behind the {self._index} yielded")
        sd.update(consumed=consumed, marked=self._consumed is not None, edges=list(self.edges),
                  drawn=self._drawn(consumed), excluded=dict(self._excluded), config=self._fingerprint(),
                  pipeline=snapshot.to_dict() if snapshot is not None else None)
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue where the checkpoint's consumption ended. Every rank draws all ranks' batches of a step, so the
        position is global: ``drawn`` batches of the epoch's stream. At the same DP size the pipeline continues
        from the stored state (source byte offsets, shuffle buffers, buckets, RNG states): O(1) in the position,
        O(buffer sizes) to rebuild the buffered items. At another DP size the batching differs (buckets are drawn
        per step of ``world_size`` batches), so the old stream is replayed (O(position)) to learn which items were
        consumed, and the epoch restarts without them: no item of the epoch is seen twice or skipped. Those item
        keys stay in the state until the epoch ends (memory and checkpoint size grow with the items consumed
        before a DP change)."""
        sd = copy.deepcopy(dict(state_dict))  # Lhotse's loaders consume the dict they are given
        marked, self.edges, drawn = sd.pop("marked"), sd.pop("edges"), sd.pop("drawn")
        self._excluded = Counter(sd.pop("excluded"))
        pipeline = sd.pop("pipeline", None)
        sd.pop("consumed")
        config = sd.pop("config")
        if config != self._fingerprint():
            raise ValueError(f"sampler config differs from the checkpoint's:\n{config}\nvs\n{self._fingerprint()}")
        world, sd["world_size"] = sd["world_size"], self.world_size
        super().load_state_dict(sd)  # epoch, diagnostics, seed checks
        self._just_restored_state = False
        if world == self.world_size:
            iter(self)
            if pipeline is not None:
                self._state = _State.from_dict(pipeline)
                self._snapshots[-1] = self._state.copy()  # a checkpoint before the next batch stores it again
            elif drawn:
                raise ValueError("the checkpoint has no pipeline state for its position")
        else:
            world, self.world_size = self.world_size, world  # replay at the checkpoint's DP size
            iter(self)
            consumed, done = Counter(), 0
            while done < drawn:
                step = self._draw_step(self._state)
                if not step:
                    raise ValueError(f"epoch {self.epoch} has {done} batches, the checkpoint consumed {drawn}")
                consumed.update(_key(it) for b in step[: drawn - done] for it in b)
                done += len(step)
            self.world_size, self._excluded = world, self._excluded + consumed
            iter(self)
            drawn = 0
        self._skipped = drawn
        self._consumed = 0 if marked else None
        self.real_tokens = self.padded_tokens = 0
        self._just_restored_state = True  # the next iter() continues here instead of restarting the epoch

    def _fingerprint(self) -> dict[str, Any]:
        return dict(
            streams=[[s.name, s.kind, float(s.weight), bool(s.repeat)] for s in self.streams],
            max_tokens=self.max_tokens, max_batch_size=self.max_batch_size, max_item_cost=self.max_item_cost,
            buffer_size=self.buffer_size, shuffle_buffer_size=self.shuffle_buffer_size,
            sync_buckets=self.sync_buckets, **({"pack": True} if self.pack else {}),
        )


def _open_source(s: Stream):
    if s.kind == "text":
        if isinstance(s.source, (str, Path)):
            check_text_file(s.source)  # now, not mid-epoch: non-UTF-8 bytes or an empty file name file and line
            return TextFile(s.source)
        return s.source  # a re-iterable of strings
    if isinstance(s.source, (str, Path)):
        return CutSet(ManifestCuts(s.source)) if ".jsonl" in str(s.source) else load_manifest_lazy_or_eager(s.source, CutSet)
    return s.source


def _key(item) -> str:
    return f"{item_kind(item)}|{item.id}"


def _take(counts: Counter, key: str) -> bool:
    """Use up one of ``key``'s counts; False when none is left."""
    if counts.get(key, 0) <= 0:
        return False
    counts[key] -= 1
    return True


def _spread(batches: list[list], n: int) -> list[list]:
    """Give each of ``n`` ranks a batch: halve the largest batch until there are enough (halves never cost more
    than the whole); with fewer items than ranks left, some ranks repeat an item."""
    batches = list(batches)
    while len(batches) < n:
        i = max(range(len(batches)), key=lambda k: len(batches[k]))
        b = batches[i]
        if len(b) > 1:
            batches[i : i + 1] = [b[: len(b) // 2], b[len(b) // 2 :]]
        else:
            batches.append([b[0]])
    return batches


def build_sampler(cfg, cost_fn: Callable[[Any], int], dp_rank: int = 0, dp_world_size: int = 1) -> InterleavingSampler:
    """Build from a dict / OmegaConf config whose keys are ``InterleavingSampler``'s keyword arguments, with
    ``streams`` a list of ``Stream`` fields. Example YAML::

        streams:
          - {source: corpus/cuts_train.jsonl.gz, kind: asr, weight: 0.4}
          - {source: corpus/cuts_train.jsonl.gz, kind: interleaved, weight: 0.4}
          - {source: corpus/domain_text.txt, kind: text, weight: 0.2, repeat: true}
        max_tokens: 8192
        max_item_cost: 1024
        num_buckets: 8
        seed: 0
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    streams = [Stream(**s) for s in cfg.pop("streams")]
    return InterleavingSampler(streams, cost_fn, dp_rank=dp_rank, dp_world_size=dp_world_size, **cfg)
