"""Our data in NeMo's Lhotse config language, and the training DataLoader built from one YAML section.

NeMo reads data from an ``input_cfg`` list whose entries name a registered ``type`` (``@data_type_parser``). We
register two types, so NeMo's ``read_cutset_from_config`` (and any NeMo recipe) can name them:

* ``jstip_cuts``: ``{type: jstip_cuts, cuts_path: PATH | [PATH, ...], kind: asr | interleaved | text}``, a Lhotse
  cut manifest whose cuts are tagged with the kind (``custom["jstip_kind"]``, on copies); relative audio paths
  resolve against the manifest, as with NeMo's ``lhotse`` type. ``kind: text`` trains on the transcripts as text
  only (the audio is never read): the control that gives a mixture interleaving's transcript text without speech.
  Instead of ``cuts_path``: ``shar_path: DIR`` (a Lhotse Shar directory with a ``recording`` field), or NeMo's
  ``manifest_filepath`` + ``tarred_audio_filepaths`` + ``sampling_rate`` (kinds ``asr`` and ``text``); the
  sampler's process reads their metadata only, the workers read each clip from its tar (``data/tarred.py``).
* ``jstip_text``: ``{type: jstip_text, paths: PATH | [PATH, ...]}``, domain text, one sentence per line, as NeMo
  ``TextExample`` items tagged ``text``; blank lines are skipped; finite (the sampler repeats it); not tarred,
  so it mixes with ``jstip_cuts`` in a NeMo ``input_cfg``. A missing or empty file is an error when it is read.

NeMo's loader has no hook for a custom sampler class (docs/data.md), so ``build_dataloader`` reads each
``input_cfg`` entry with NeMo's own ``read_cutset_from_config`` (any registered type works: ``jstip_cuts``,
``jstip_text``, ``lhotse``, ``lhotse_shar``, ``nemo``, ``nemo_tarred``, ``txt``, ...), makes it one ``Stream`` of
our ``InterleavingSampler``, and wraps sampler + ``JSTIPDataset`` in a torch ``DataLoader``. Every section maps
1:1 to a class: ``input_cfg`` entries -> ``Stream`` (``kind``, ``weight``, ``repeat``, ``name``; the rest goes to
NeMo), ``sampler`` -> ``InterleavingSampler``, ``interleave`` -> ``InterleaveConfig``, ``dataset`` ->
``DatasetConfig``, ``loader`` -> ``torch.utils.data.DataLoader``, ``exact_cost`` -> ``CostFn.follow``.

Registration runs at import and is idempotent (re-import, ``importlib.reload`` and ``register()`` are no-ops;
a *different* package owning one of our names is an error). Importing this module imports NeMo (~10 s).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator

import torch
from lhotse import CutSet
from lhotse.lazy import LazyIteratorChain
from lhotse.utils import fastcopy
from nemo.collections.common.data.lhotse.cutset import (
    KNOWN_DATA_CONFIG_TYPES,
    data_type_parser,
    read_cutset_from_config,
    resolve_relative_paths,
)
from nemo.collections.common.data.lhotse.nemo_adapters import expand_sharded_filepaths
from nemo.collections.common.data.lhotse.text_adapters import TextExample
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from nemo_jstip.data.dataset import DatasetConfig, JSTIPDataset, _text, make_cost_fn
from nemo_jstip.data.examples import ExampleBuilder
from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.interleave import InterleaveConfig
from nemo_jstip.data.manifest import ManifestCuts, TextFile, check_text_file
from nemo_jstip.data.sampler import KIND_KEY, KINDS, InterleavingSampler, Stream
from nemo_jstip.data.tarred import NemoTarredCuts, SharCuts

__all__ = ["read_jstip_cuts", "read_jstip_text", "register", "streams_from_input_cfg", "build_dataloader"]

STREAM_KEYS = ("kind", "weight", "repeat", "name")  # input_cfg keys that are ours, not NeMo's
# keys NeMo's own text parsers read without a default (a missing one is an omegaconf error deep in NeMo)
NEMO_TEXT_DEFAULTS = {"txt": {"language": None}, "txt_jsonl": {"language": None, "text_field": "text"}}
LOADER_KEYS = ("num_workers", "prefetch_factor", "pin_memory", "persistent_workers", "timeout")  # -> DataLoader


def _tag(cut, kind: str):
    return fastcopy(cut, custom={**(cut.custom or {}), KIND_KEY: kind})


def read_jstip_cuts(config) -> tuple[CutSet, bool]:
    """``type: jstip_cuts``: cut manifest(s) at ``cuts_path``, each cut tagged with ``kind``."""
    kind = config.get("kind")
    if kind not in KINDS:
        raise ValueError(f"jstip_cuts needs kind: {' | '.join(KINDS)}, got {kind!r} ({config.get('cuts_path')})")
    tag = partial(_tag, kind=kind)
    if config.get("shar_path"):
        return CutSet(SharCuts(config.shar_path, tag)), False
    if config.get("tarred_audio_filepaths"):
        if kind == "interleaved":
            raise ValueError(f"jstip_cuts: NeMo tarred manifests hold no word alignments, so kind: interleaved "
                             f"cannot use them ({config.manifest_filepath}); write the cuts as Lhotse Shar")
        if not config.get("sampling_rate"):
            raise ValueError(f"jstip_cuts: NeMo tarred manifests need sampling_rate ({config.manifest_filepath})")
        return CutSet(NemoTarredCuts(config.manifest_filepath, config.tarred_audio_filepaths,
                                     config.sampling_rate, tag)), False
    paths = expand_sharded_filepaths(config.cuts_path)
    if all(".jsonl" in str(p) for p in paths):
        return CutSet(JstipCuts(paths, kind)), False
    parts = [CutSet.from_file(p).map(partial(resolve_relative_paths, manifest_path=p)) for p in paths]
    cuts = parts[0] if len(parts) == 1 else CutSet(LazyIteratorChain(*parts))
    return cuts.map(tag), False


def _chain_from(files: list, position, convert) -> Iterator:
    """``(convert(item, file), [file index, offset])`` over ``files`` (each with ``iter_from``) from ``position``."""
    first, offset = position if position is not None else (0, None)
    for k in range(first, len(files)):
        for item, after in files[k].iter_from(offset if k == first else None):
            yield convert(item, files[k]), [k, after]


class JstipCuts:
    """JSONL cut manifests read in order (``ManifestCuts``: a bad line names file and line), relative audio paths
    resolved against each manifest, each cut tagged with ``kind``; resumable (``iter_from``)."""

    def __init__(self, paths, kind: str):
        self.files, self.kind = [ManifestCuts(p) for p in paths], kind

    def _cut(self, cut, file):
        return _tag(resolve_relative_paths(cut, file.path), self.kind)

    def __iter__(self):
        return (cut for cut, _ in self.iter_from(None))

    def iter_from(self, position):
        return _chain_from(self.files, position, self._cut)


class TextLines:
    """Re-iterable ``TextExample`` items of text files (stripped, blank lines skipped), tagged ``text``."""

    def __init__(self, paths, language: str | None = None):
        """``paths``: a file, a list of files or a sharded pattern (``text_{0..7}.txt``). Every file must exist and
        hold at least one non-blank line and be UTF-8 throughout, checked here (when the loader is built), not deep
        inside the sampler; an error names the file and line."""
        paths = OmegaConf.to_container(paths) if OmegaConf.is_config(paths) else paths
        if not paths or not isinstance(paths, (str, list)):
            raise ValueError(f"jstip_text needs paths: a text file or a list of them, got {paths!r}")
        self.paths, self.language = expand_sharded_filepaths(paths), language
        for path in self.paths:
            check_text_file(path)

    def __iter__(self) -> Iterator[TextExample]:
        return (x for x, _ in self.iter_from(None) if x is not None)

    def iter_from(self, position):
        """``(TextExample or None for a blank line, [file index, offset])`` from ``position``."""
        return _chain_from([TextFile(p) for p in self.paths], position, self._example)

    def _example(self, line: str, file) -> TextExample | None:
        line = line.strip()
        return TextExample(line, language=self.language, custom={KIND_KEY: "text"}) if line else None


def read_jstip_text(config) -> tuple[CutSet, bool]:
    """``type: jstip_text``: domain text files at ``paths``, one sentence per line.

    Reported as not tarred (NeMo's ``txt`` says tarred), so that NeMo mixes it with ``jstip_cuts`` / ``lhotse``
    manifests without ``force_map_dataset``; reading a text file in the sampler's process is cheap.
    """
    return CutSet(TextLines(config.paths, config.get("language"))), False


_PARSERS = {"jstip_cuts": read_jstip_cuts, "jstip_text": read_jstip_text}


def register() -> None:
    """Register our input types with NeMo's Lhotse config; idempotent."""
    for name, fn in _PARSERS.items():
        current = KNOWN_DATA_CONFIG_TYPES.get(name)
        if current is fn:
            continue
        if current is not None and getattr(current, "__module__", None) != __name__:  # ours from a reload is fine
            raise RuntimeError(f"NeMo data type {name!r} is already registered by {current.__module__}")
        data_type_parser(name)(fn)


register()


class _Texts:
    """A text stream's source for the sampler: the ``.text`` of each item NeMo's parser gives (a cut's transcript),
    re-iterable."""

    def __init__(self, items):
        self.items = items

    def __iter__(self) -> Iterator[str]:
        return (_text(x) for x in self.items)

    @property
    def iter_from(self):
        """``(text, position)`` from ``position`` when the items' source can seek (``TextLines``), else absent."""
        inner = getattr(self.items, "data", None)
        if not hasattr(inner, "iter_from"):
            raise AttributeError("iter_from")
        return lambda position: ((_text(x) if x is not None else "", p) for x, p in inner.iter_from(position))


def streams_from_input_cfg(input_cfg) -> list[Stream]:
    """One ``Stream`` per ``input_cfg`` entry, the entry read by NeMo's ``read_cutset_from_config``.

    Sources are read finite and in file order (``force_finite: true``, ``shuffle: false``, ``shard_seed: 0``
    unless the entry says otherwise): the sampler repeats and shuffles, deterministically, which exact resume needs.
    Nested ``group`` entries are refused: a stream has one kind and one weight.
    """
    streams = []
    for i, entry in enumerate(_plain(input_cfg)):
        entry = dict(entry)
        if entry.get("type") == "group":
            raise ValueError(f"input_cfg[{i}]: nested groups are not supported, list the entries flat")
        kind = entry.get("kind") or ("text" if entry.get("type") in ("jstip_text", "txt", "txt_jsonl") else None)
        if kind not in KINDS:
            raise ValueError(f"input_cfg[{i}] ({entry.get('type')}): kind must be one of {KINDS}, got {kind!r}")
        nemo = {k: v for k, v in entry.items() if k not in STREAM_KEYS[1:]}
        nemo = {"force_finite": True, "shuffle": False, "shard_seed": 0,
                **NEMO_TEXT_DEFAULTS.get(nemo.get("type"), {}), **nemo}
        defaults = {k: nemo.pop(k) for k in ("force_finite", "shuffle", "shard_seed")}
        cuts, _ = read_cutset_from_config({"input_cfg": [nemo], **defaults})
        stream = {k: entry[k] for k in STREAM_KEYS[1:] if k in entry}
        streams.append(Stream(source=_Texts(cuts) if kind == "text" else cuts, kind=kind, **stream))
    return streams


def _plain(cfg) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def _identity(batch):
    return batch


def build_dataloader(
    cfg, tokenizer: PreTrainedTokenizerBase, spec: FrameSpec, dp_rank: int = 0, dp_world_size: int = 1
) -> torch.utils.data.DataLoader:
    """Sampler + dataset + DataLoader from one config section (docs/data.md has a complete YAML).

    ``tokenizer`` must already hold the JSTIP special tokens (``add_special_tokens``). The sampler stays in the
    main process (``loader.sampler``); the dataset runs in the workers. The training loop calls
    ``loader.sampler.set_epoch(epoch)`` before each epoch and ``loader.sampler.mark_consumed(batch["position"])``
    after each step; checkpoints store ``loader.sampler.state_dict()``. ``extra_input_cfg`` entries are appended to
    ``input_cfg``: a stream every mixture gets alike (e.g. the LLM's pretraining text replayed), set apart from the
    mixture's own list, which a command-line override cannot append to.
    """
    cfg = dict(_plain(cfg))
    unknown = set(cfg) - {"input_cfg", "extra_input_cfg", "sampler", "interleave", "dataset", "loader", "exact_cost"}
    if unknown:
        raise ValueError(f"unknown data config keys {sorted(unknown)}")
    builder = ExampleBuilder(tokenizer, spec, InterleaveConfig(**(cfg.get("interleave") or {})))
    dataset = JSTIPDataset(builder, DatasetConfig(**(cfg.get("dataset") or {})))
    cost_fn = make_cost_fn(builder, exact=cfg.get("exact_cost", True), prompt=dataset.cfg)
    inputs = list(cfg["input_cfg"]) + list(cfg.get("extra_input_cfg") or [])
    sampler = InterleavingSampler(streams_from_input_cfg(inputs), cost_fn, dp_rank=dp_rank,
                                  dp_world_size=dp_world_size, **(cfg.get("sampler") or {}))
    cost_fn.follow(sampler)
    loader = dict(cfg.get("loader") or {})
    if bad := set(loader) - set(LOADER_KEYS):
        raise ValueError(f"unknown loader keys {sorted(bad)}; allowed: {LOADER_KEYS}")
    if not loader.get("num_workers"):
        loader.pop("prefetch_factor", None), loader.pop("persistent_workers", None)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, collate_fn=_identity, **loader)
