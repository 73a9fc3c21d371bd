"""The JSTIP training mixture (JSTIP.md step 6) as a Lhotse sampler.

Weighted streams of ASR, interleaved and text-only examples -> batches limited by a token budget that counts
padding, bucketed by cost, split over data-parallel ranks, exactly resumable behind a prefetching DataLoader.

Built from Lhotse's sampler parts rather than beside them:

* ``CutSampler``: DP split (every rank draws the same ``world_size`` batches per step and keeps its own),
  ``set_epoch``, ``filter``, diagnostics and the base ``state_dict``.
* ``LazyIteratorMultiplexer`` (what ``CutSet.mux`` builds) mixes the streams by weight; ``streaming_shuffle`` shuffles
  each stream; ``DynamicBucketer`` / ``DurationBatcher`` form the batches; ``estimate_duration_buckets`` estimates
  bucket edges. All of them are driven by :class:`PaddedTokenConstraint`, a ``SamplingConstraint`` on ``cost_fn``.

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
``sampler.mark_consumed(position)`` after each step; ``state_dict()`` then stores how many batches of the epoch's
shared stream (all DP ranks' batches) were drawn up to the last *consumed* one (before the first ``mark_consumed``
it counts the batches yielded, which is exact only without workers). ``load_state_dict`` replays the epoch from its
start up to there (the whole pipeline is a pure function of seed, epoch, DP size and config), so the next batch is
the one an uninterrupted run would have trained on next. At another DP size the replay instead collects the items
consumed so far, and the epoch restarts without them (see ``load_state_dict``). Replaying costs one pass over the
epoch's metadata up to that point (see benchmarks/bench_sampler.py).

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
import logging
from collections import Counter
import random
from bisect import bisect_left
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from lhotse import CutSet
from lhotse.dataset.sampling.base import CutSampler, SamplingConstraint
from lhotse.dataset.sampling.dynamic import DurationBatcher, Filter
from lhotse.dataset.sampling.dynamic_bucketing import DynamicBucketer, estimate_duration_buckets
from lhotse.lazy import LazyIteratorMultiplexer
from lhotse.serialization import load_manifest_lazy_or_eager
from lhotse.utils import fastcopy, streaming_shuffle
from omegaconf import DictConfig, OmegaConf

from nemo_jstip.data.manifest import ManifestCuts, check_text_file, read_lines

log = logging.getLogger(__name__)

KINDS = ("asr", "interleaved", "text")
KIND_KEY = "jstip_kind"
COST_KEY = "jstip_cost"
STREAM_KEY = "jstip_stream"  # the name of the stream an item came from, for per-source bad-input counts
# the sampler's share of the bad-input table (nemo_jstip.data.dataset.PROBLEMS has the dataset's)
MAX_DROPPED_IDS, MAX_LOGGED = 100_000, 10
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


class MixedBatch(list):
    """The items of one batch, plus where it sits in the epoch and its token counts."""

    def __init__(self, items: Iterable, epoch: int, index: int) -> None:
        super().__init__(items)
        self.epoch, self.index = epoch, index
        costs = [item_cost(it) for it in self]
        self.real_tokens = sum(costs)
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
    batch whose items share a bucket (as ``DynamicBucketer`` / ``DurationBatcher`` build them) never exceeds
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
    :param bucket_edges: ascending upper cost edges instead of estimating them.
    :param buffer_size: items held across the buckets (``DynamicBucketer``).
    :param shuffle: shuffle each stream (``streaming_shuffle``) and within buckets.
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
        self.cost_fn = cost_fn
        self.max_tokens = max_tokens
        self.max_batch_size = max_batch_size
        self.max_item_cost = max_item_cost or max_tokens
        assert self.max_item_cost <= max_tokens, "max_item_cost must fit in max_tokens"
        self.buffer_size = buffer_size
        self.shuffle_buffer_size = shuffle_buffer_size
        self.sync_buckets = sync_buckets
        if bucket_edges is not None:
            edges = [int(e) for e in bucket_edges if e < self.max_item_cost]
            assert edges == sorted(set(edges)), "bucket_edges must be strictly ascending"
        elif num_buckets > 1:
            edges = self._estimate_edges(num_buckets, num_items_for_edges_estimate)
        else:
            edges = []
        self.edges = edges + [self.max_item_cost]
        self._batches: Iterator | None = None
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

    # ---- the pipeline: streams -> mixture -> filter -> batches ----
    def _rng(self, *parts) -> random.Random:
        return random.Random("/".join(map(str, (self.seed, self.epoch) + parts)))

    def _stream_items(self, i: int) -> Iterator:
        s = self.streams[i]
        for rep in itertools.count():
            raw = iter(self._sources[i]) if s.kind != "text" else _text_lines(s.name, self._sources[i])
            if self.shuffle:
                raw = streaming_shuffle(raw, bufsize=self.shuffle_buffer_size, rng=self._rng(s.name, rep))
            empty = True
            for x in raw:
                empty = False
                if s.kind == "text":
                    item = TextItem(id=x[0], text=x[1], custom={KIND_KEY: "text", STREAM_KEY: s.name})
                else:
                    item = fastcopy(x, custom={**(x.custom or {}), KIND_KEY: s.kind, STREAM_KEY: s.name})
                item.custom[COST_KEY] = int(self.cost_fn(item))
                yield item
            if not s.repeat or empty:
                return

    def _mixture(self) -> Iterator:
        streams = [self._stream_items(i) for i in range(len(self.streams))]
        if len(streams) == 1:
            return streams[0]
        seed = self._rng("mux").randrange(2**31)
        weights = [s.weight for s in self.streams]
        return iter(LazyIteratorMultiplexer(*streams, weights=weights, seed=seed, stop_early=True))

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

    def __iter__(self) -> "InterleavingSampler":
        if self._just_restored_state:
            return self
        self.diagnostics.reset_current_epoch()
        self._index, self._consumed = 0, (0 if self._consumed is not None else None)
        self._skipped, self._drawn_after = 0, {}
        left = Counter(self._excluded)
        items = Filter(
            ((it,) for it in self._mixture() if not _take(left, _key(it))),  # 1-tuples, as Lhotse's batchers and diagnostics expect
            predicate=lambda t: self._keep(t[0]),
            diagnostics=self.diagnostics,
        )
        constraint = PaddedTokenConstraint(self.max_tokens, self.edges, self.max_batch_size)
        if len(self.edges) > 1:
            batches = DynamicBucketer(
                items,
                duration_bins=self.edges[:-1],
                world_size=self.world_size,
                constraint=constraint,
                drop_last=self.drop_last,
                buffer_size=self.buffer_size,
                shuffle=self.shuffle,
                rng=self._rng("in-bucket"),
                bucket_rng=self._rng("bucket-choice") if self.sync_buckets else None,
                diagnostics=self.diagnostics,
            )
        else:
            batches = DurationBatcher(items, constraint=constraint, drop_last=self.drop_last, diagnostics=self.diagnostics)
        self._batches = iter(batches)
        return self

    def _next_batch(self) -> list:
        return list(next(self._batches))

    def __next__(self) -> MixedBatch:
        self.allow_iter_to_reset_state()
        batches = []
        for _ in range(self.world_size):  # every rank builds the whole step, keeps its own batch
            try:
                batches.append(self._next_batch())
            except StopIteration:
                break
        if not batches or (len(batches) < self.world_size and self.drop_last):
            raise StopIteration
        batch = MixedBatch(_spread(batches, self.world_size)[self.rank], self.epoch, self._index)
        self._drawn_after[self._index] = self._drawn(self._index) + len(batches)
        self._index += 1
        self.diagnostics.keep(batch)
        self.real_tokens += batch.real_tokens
        self.padded_tokens += batch.padded_tokens
        return batch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # counters belong to an epoch; state_dict() may come before the next iter()
            self._index, self._consumed = 0, (None if self._consumed is None else 0)
            self._skipped, self._drawn_after, self._excluded = 0, {}, Counter()
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

    def _drawn(self, consumed: int) -> int:
        """Batches drawn from the shared stream (all DP ranks) once this rank's first ``consumed`` are done."""
        return self._drawn_after[consumed - 1] if consumed else self._skipped

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd.update(consumed=self.batches_consumed, marked=self._consumed is not None, edges=list(self.edges),
                  drawn=self._drawn(self.batches_consumed), excluded=dict(self._excluded), config=self._fingerprint())
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue where the checkpoint's consumption ended. Every rank draws all ranks' batches of a step, so the
        position is global: ``drawn`` batches of the epoch's stream. At the same DP size the stream is replayed up to
        there. At another DP size the batching differs (buckets are drawn per step of ``world_size`` batches), so
        the old stream is replayed to learn which items were consumed, and the epoch restarts without them: no
        item of the epoch is seen twice or skipped. Those item keys stay in the state until the epoch ends
        (memory and checkpoint size grow with the items consumed before a DP change)."""
        sd = copy.deepcopy(dict(state_dict))  # Lhotse's loaders consume the dict they are given
        marked, self.edges, drawn = sd.pop("marked"), sd.pop("edges"), sd.pop("drawn")
        self._excluded = Counter(sd.pop("excluded"))
        sd.pop("consumed")
        config = sd.pop("config")
        if config != self._fingerprint():
            raise ValueError(f"sampler config differs from the checkpoint's:\n{config}\nvs\n{self._fingerprint()}")
        world, sd["world_size"] = sd["world_size"], self.world_size
        super().load_state_dict(sd)  # epoch, diagnostics, seed checks
        self._just_restored_state = False
        world, self.world_size = self.world_size, world  # replay at the checkpoint's DP size
        iter(self)
        consumed = Counter()
        for i in range(drawn):
            try:
                consumed.update(_key(it) for it in self._next_batch())
            except StopIteration:
                raise ValueError(f"epoch {self.epoch} has {i} batches, the checkpoint consumed {drawn}") from None
        if world != self.world_size:
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
            sync_buckets=self.sync_buckets,
        )


def _open_source(s: Stream):
    if s.kind == "text":
        if isinstance(s.source, (str, Path)):
            check_text_file(s.source)  # now, not mid-epoch: non-UTF-8 bytes or an empty file name file and line
        return s.source  # a path (read on each pass) or a re-iterable of strings
    if isinstance(s.source, (str, Path)):
        return CutSet(ManifestCuts(s.source)) if ".jsonl" in str(s.source) else load_manifest_lazy_or_eager(s.source, CutSet)
    return s.source


def _text_lines(name: str, source) -> Iterator[tuple[str, str]]:
    if isinstance(source, (str, Path)):
        yield from ((f"{name}:{i - 1}", line.strip()) for i, line in read_lines(source) if line.strip())
    else:
        yield from ((f"{name}:{i}", text) for i, text in enumerate(source) if text.strip())


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
