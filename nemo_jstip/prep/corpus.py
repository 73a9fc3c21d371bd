"""The embedded default corpus: entity-rich synthetic speech with exact word alignments, fully offline.

    python -m nemo_jstip.prep.corpus out_dir=data/demo_corpus [seed=1234] [sizes.general_train=2000] ...

Writes to `out_dir` (see docs/corpus.md for the layout):
  {domain}_{split}_cuts.jsonl  Lhotse cuts: 16 kHz FLAC, one supervision with alignment["word"] and
                               custom = {domain, entities: [{text, type, start, end, seen_in_text}], ...}
  {domain}_text.txt / .jsonl   domain transcription text (one sentence per line / with entity annotations)
  entities.json, corpus.json   the entity partition; the config and statistics
A folder whose `.complete` stamp matches the config is reused as it is; anything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from omegaconf import OmegaConf
from scipy.signal import resample_poly

from nemo_jstip.prep.sentences import (
    GROUP_SPLITS,
    Sentence,
    SentenceGenerator,
    common_words,
    domain_words,
    load_domain,
    partition_entities,
    word_sequences,
)

DOMAINS = ("medical", "banking")
ACCENTS = ["en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]


@dataclass
class CorpusConfig:
    out_dir: str = "data/demo_corpus"
    seed: int = 1234
    sizes: dict[str, int] = field(
        default_factory=lambda: {
            "general_train": 2000,
            "general_dev": 100,
            "general_test": 100,
            "medical_text": 1500,
            "medical_dev": 100,
            "medical_test": 150,
            "banking_text": 1500,
            "banking_dev": 100,
            "banking_test": 150,
            "qa_test": 69,
            # TTS of the domain text with training voices: the "synthetic pairs" baseline (jstip_synthetic); off by default
            "medical_textspeech": 0,
            "banking_textspeech": 0,
            # sequences of 4-10 words (the domains' everyday words + common English words, never an entity),
            # added to general_train: the breadth of a real ASR corpus (docs/corpus.md)
            "general_words": 10000,
            # domain templates with generic values in the entity slots, added to general_train (sentences.py,
            # 'carrier'); off: they teach "entity slot -> generic value" (docs/results.md, "Settings chosen on dev")
            "medical_carrier": 0,
            "banking_carrier": 0,
        }
    )
    # Fractions of each entity pool per group (see sentences.GROUP_SPLITS); "shared" takes the rest.
    entity_groups: dict[str, float] = field(
        default_factory=lambda: {"shared": 0.2, "text_test": 0.3, "text_dev": 0.2, "test_only": 0.15, "dev_only": 0.15}
    )
    accents: list[str] = field(default_factory=lambda: list(ACCENTS))
    # espeak-ng voice variants: training voices never speak dev/test/qa, so held-out voices are tested
    train_variants: list[str] = field(default_factory=lambda: ["m1", "m2", "m4", "m5", "m7", "f1", "f3", "f5"])
    eval_variants: list[str] = field(default_factory=lambda: ["m3", "m6", "f2", "f4"])
    rate_wpm: list[int] = field(default_factory=lambda: [125, 195])
    pitch: list[int] = field(default_factory=lambda: [30, 70])
    snr_db: list[float] = field(default_factory=lambda: [20.0, 40.0])
    pad_s: list[float] = field(default_factory=lambda: [0.05, 0.35])  # silence before and after the speech
    common_words: int = 1000  # how many of wordlists/common_words.txt the word sequences use (most frequent first)
    sampling_rate: int = 16000
    num_workers: int = 2


# Bumped when the generator's logic changes what a config produces: an older folder is then rebuilt, not reused.
CORPUS_VERSION = 2  # 2: general_train holds word sequences (and optional carriers)


@dataclass
class _Job:
    cut_id: str
    words: list[str]
    voice: str
    rate: int
    pitch: int
    snr_db: float
    pad: tuple[float, float]
    gain: float
    noise_seed: int
    path: str
    skippable: bool = False  # word sequences: one espeak-ng cannot time is dropped (counted), not fatal


_ESPEAK = None
_CHUNK = 64  # utterances per synthesis process


def _init_worker():
    global _ESPEAK
    from nemo_jstip.prep.espeak import Espeak

    _ESPEAK = Espeak()


def _synthesize(job: _Job, sampling_rate: int) -> tuple[int, list[tuple[float, float]]]:
    """Speak one sentence, resample, pad, add noise, write FLAC; return num_samples and word times."""
    u = _ESPEAK.synthesize(job.words, job.voice, job.rate, job.pitch)
    g = math.gcd(sampling_rate, u.sampling_rate)
    x = resample_poly(u.audio.astype(np.float32) / 32768.0, sampling_rate // g, u.sampling_rate // g)
    lead, trail = (int(round(p * sampling_rate)) for p in job.pad)
    x = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(trail, np.float32)])
    rng = np.random.default_rng(job.noise_seed)
    speech_power = float(np.mean(x[lead : len(x) - trail] ** 2)) + 1e-12
    x = x + rng.standard_normal(len(x)).astype(np.float32) * math.sqrt(speech_power / 10 ** (job.snr_db / 10))
    x = (job.gain / (np.abs(x).max() + 1e-9) * x).astype(np.float32)
    Path(job.path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(job.path, x, sampling_rate, format="FLAC", subtype="PCM_16")
    duration = len(x) / sampling_rate
    offset = lead / sampling_rate
    times = [(s + offset, min(e + offset, duration)) for s, e in u.word_times]
    return len(x), times


def _synthesize_chunk(args):
    from nemo_jstip.prep.espeak import EspeakError

    jobs, sampling_rate = args
    out = []
    for j in jobs:
        try:
            out.append(_synthesize(j, sampling_rate))
        except EspeakError as e:
            if not j.skippable:
                raise
            out.append(str(e))
    return out


def _make_cut(job: _Job, num_samples: int, times, sentence: Sentence, custom: dict, sampling_rate: int):
    from lhotse import MonoCut, Recording, SupervisionSegment
    from lhotse.audio import AudioSource
    from lhotse.supervision import AlignmentItem

    duration = num_samples / sampling_rate
    for w, (s, e) in zip(job.words, times):
        if not e > s:
            raise RuntimeError(f"{job.cut_id}: espeak-ng gave word {w!r} no duration ({s:.3f}-{e:.3f} s)")
    rec = Recording(job.cut_id, [AudioSource("file", [0], job.path)], sampling_rate, num_samples, duration)
    ticks = [(round(s * 1e4), round(e * 1e4)) for s, e in times]  # 0.1 ms grid: contiguous words stay contiguous
    align = [AlignmentItem(w, s / 1e4, (e - s) / 1e4) for w, (s, e) in zip(job.words, ticks)]
    sup = SupervisionSegment(
        id=job.cut_id,
        recording_id=job.cut_id,
        start=0.0,
        duration=duration,
        channel=0,
        text=sentence.text,
        language="en",
        speaker=job.voice,
        alignment={"word": align},
        custom={**custom, "entities": sentence.entities},
    )
    return MonoCut(job.cut_id, 0.0, duration, 0, supervisions=[sup], recording=rec)


class CorpusBuilder:
    def __init__(self, cfg: CorpusConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir).resolve()
        self.rng = np.random.default_rng(cfg.seed)

    def _jobs(self, name: str, sentences: list[Sentence], variants: list[str]) -> list[_Job]:
        c, rng = self.cfg, np.random.default_rng([self.cfg.seed, int(hashlib.md5(name.encode()).hexdigest()[:8], 16)])
        jobs = []
        for i, s in enumerate(sentences):
            cut_id = f"{name.replace('_', '-')}-{i:05d}"
            voice = f"{c.accents[rng.integers(len(c.accents))]}+{variants[rng.integers(len(variants))]}"
            jobs.append(
                _Job(
                    cut_id=cut_id,
                    words=s.words,
                    voice=voice,
                    rate=int(rng.integers(c.rate_wpm[0], c.rate_wpm[1] + 1)),
                    pitch=int(rng.integers(c.pitch[0], c.pitch[1] + 1)),
                    snr_db=float(rng.uniform(*c.snr_db)),
                    pad=(float(rng.uniform(*c.pad_s)), float(rng.uniform(*c.pad_s))),
                    gain=float(rng.uniform(0.3, 0.9)),
                    noise_seed=int(rng.integers(2**31)),
                    path=str(self.out / "audio" / name / f"{cut_id}.flac"),
                    skippable=name == "general_words",
                )
            )
        return jobs

    def plan(self) -> dict[str, tuple[list[Sentence], list[dict], str]]:
        """split name -> (sentences, per-sentence custom fields, voice set); no audio yet."""
        c, rng, size = self.cfg, self.rng, self.cfg.sizes
        plans = {}
        general = load_domain("general")
        gen = SentenceGenerator(general, {}, "train", rng)
        taken: set[str] = set()
        for split in ("train", "dev", "test"):
            sents = gen.sample_unique(size.get(f"general_{split}", 0), exclude=taken)
            taken |= {s.text for s in sents}
            plans[f"general_{split}"] = (sents, [{"domain": "general"}] * len(sents), "train" if split == "train" else "eval")
        self.partition = {}
        for d in DOMAINS:
            domain = load_domain(d)
            part = self.partition[d] = partition_entities(domain, c.entity_groups, rng)
            taken, text_entities = set(), set()
            for split in ("text", "dev", "test"):
                sents = SentenceGenerator(domain, part, split, rng).sample_unique(size.get(f"{d}_{split}", 0), exclude=taken)
                taken |= {s.text for s in sents}
                if split == "text":
                    text_entities = {e["text"] for s in sents for e in s.entities}
                else:
                    for s in sents:
                        for e in s.entities:
                            e["seen_in_text"] = e["text"] in text_entities
                plans[f"{d}_{split}"] = (sents, [{"domain": d}] * len(sents), "eval")
            n = size.get(f"{d}_textspeech", 0)
            text_sents = plans[f"{d}_text"][0]
            if n > len(text_sents):
                raise ValueError(f"sizes.{d}_textspeech={n} exceeds sizes.{d}_text={len(text_sents)}")
            plans[f"{d}_textspeech"] = (text_sents[:n], [{"domain": d}] * n, "train")
        for i, d in enumerate(DOMAINS):  # own RNG: the other splits are the same with or without carriers
            gen = SentenceGenerator(load_domain(d), self.partition[d], "carrier", np.random.default_rng([c.seed, 17, i]))
            sents = gen.sample_unique(size.get(f"{d}_carrier", 0))
            plans[f"{d}_carrier"] = (sents, [{"domain": "general", "carrier": d}] * len(sents), "train")
        # the domains' everyday words and the most common English words: common words inside entities ("two",
        # "hundred", "account") are heard as in any real corpus; entities themselves never are
        entities = {e for part in self.partition.values() for groups in part.values() for values in groups.values()
                    for e in values}
        everyday = [w for d in DOMAINS for w in domain_words(load_domain(d))]
        words = [w for w in dict.fromkeys(everyday + common_words()[: c.common_words]) if w not in entities]
        sents = word_sequences(words, size.get("general_words", 0), np.random.default_rng([c.seed, 19]),
                               forbidden={e for e in entities if " " in e})
        plans["general_words"] = (sents, [{"domain": "general", "words": True}] * len(sents), "train")
        items = load_domain("qa")["items"]
        n = size.get("qa_test", 0)
        qa = [items[i % len(items)] for i in range(n)]
        plans["qa_test"] = (
            [Sentence(q.split()) for q, _ in qa],
            [{"domain": "qa", "question": q, "answers": list(map(str, a))} for q, a in qa],
            "eval",
        )
        return plans

    def build(self) -> dict:
        from lhotse import CutSet

        c, t0 = self.cfg, time.time()
        plans = self.plan()
        if self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True)
        stats = {}
        spoken = {k: v for k, v in plans.items() if not k.endswith("_text") and v[0]}
        all_jobs = {
            k: self._jobs(k, sents, c.train_variants if voices == "train" else c.eval_variants)
            for k, (sents, _, voices) in spoken.items()
        }
        # espeak-ng keeps state between utterances (its output drifts by a few samples), so each fixed chunk of
        # jobs runs in a fresh process: the corpus is then identical whatever num_workers is.
        flat = [j for jobs in all_jobs.values() for j in jobs]
        chunks = [(flat[i : i + _CHUNK], c.sampling_rate) for i in range(0, len(flat), _CHUNK)]
        ctx = mp.get_context("fork")
        with ctx.Pool(max(1, c.num_workers), initializer=_init_worker, maxtasksperchild=1) as pool:
            results = (r for chunk in pool.imap(_synthesize_chunk, chunks) for r in chunk)
            cuts = {}
            for name, jobs in all_jobs.items():
                kept, cuts[name], skipped = [], [], []
                for j, s, cu in zip(jobs, *plans[name][:2]):
                    r = next(results)
                    try:
                        if isinstance(r, str):
                            raise RuntimeError(r)
                        cuts[name].append(_make_cut(j, *r, s, cu, c.sampling_rate))
                        kept.append(s)
                    except RuntimeError as e:  # EspeakError is one
                        if not j.skippable:
                            raise
                        skipped.append(f"{j.cut_id} ({e})")
                if skipped:
                    print(f"{name}: skipped {len(skipped)} that espeak-ng could not time, e.g. {skipped[0]}")
                stats[name] = _split_stats(kept, sum(cut.duration for cut in cuts[name])) | {"skipped": len(skipped)}
        for name in [n for n in cuts if n.endswith("_carrier") or n == "general_words"]:  # general ASR data too
            cuts.setdefault("general_train", []).extend(cuts.pop(name))
        for name, split in cuts.items():
            CutSet.from_cuts(split).to_file(self.out / f"{name}_cuts.jsonl")
        for d in DOMAINS:
            sents = plans[f"{d}_text"][0]
            (self.out / f"{d}_text.txt").write_text("".join(s.text + "\n" for s in sents))
            with open(self.out / f"{d}_text.jsonl", "w") as f:
                for i, s in enumerate(sents):
                    f.write(json.dumps({"id": f"{d}-text-{i:05d}", "text": s.text, "domain": d, "entities": s.entities}) + "\n")
            stats[f"{d}_text"] = _split_stats(sents, 0.0)
        (self.out / "entities.json").write_text(json.dumps(self.partition, indent=1, sort_keys=True))
        config = {k: v for k, v in asdict(c).items() if k != "num_workers"}  # what the content depends on
        summary = {"config": config | {"out_dir": str(self.out)}, "splits": stats}
        (self.out / "corpus.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
        (self.out / ".complete").write_text(config_hash(c))  # written last: a folder without it is incomplete
        summary["build_seconds"] = round(time.time() - t0, 1)
        return summary


def _split_stats(sents: list[Sentence], seconds: float) -> dict:
    mentions = [e for s in sents for e in s.entities]
    return {
        "utterances": len(sents),
        "hours": round(seconds / 3600, 4),
        "words": sum(len(s.words) for s in sents),
        "entity_mentions": len(mentions),
        "unique_entities": len({e["text"] for e in mentions}),
        "mentions_unseen_in_text": sum(1 for e in mentions if e.get("seen_in_text") is False),
    }


def config_hash(cfg: CorpusConfig) -> str:
    """What determines the corpus content (out_dir and num_workers do not)."""
    d = asdict(cfg)
    d.pop("num_workers")
    d["out_dir"] = str(Path(cfg.out_dir).resolve())  # absolute audio paths live in the manifests
    d["version"] = CORPUS_VERSION
    d["wordlists"] = {p.name: p.read_text() for p in sorted((Path(__file__).parent / "wordlists").glob("*.*"))}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def is_complete(cfg: CorpusConfig) -> bool:
    stamp = Path(cfg.out_dir) / ".complete"
    return stamp.exists() and stamp.read_text() == config_hash(cfg)


def build_corpus(cfg: CorpusConfig, force: bool = False) -> Path:
    """Build the corpus unless an identical one is already complete; return its folder."""
    if force or not is_complete(cfg):
        summary = CorpusBuilder(cfg).build()
        print(f"built corpus in {Path(cfg.out_dir).resolve()} ({summary['build_seconds']} s)")
    else:
        print(f"reusing complete corpus in {Path(cfg.out_dir).resolve()}")
    return Path(cfg.out_dir)


def format_stats(out_dir: str | Path) -> str:
    stats = json.loads((Path(out_dir) / "corpus.json").read_text())["splits"]
    cols = ["utterances", "hours", "words", "entity_mentions", "unique_entities", "mentions_unseen_in_text"]
    rows = [f"| split | {' | '.join(cols)} |", "|" + "---|" * (len(cols) + 1)]
    rows += [f"| {k} | " + " | ".join(str(v[c]) for c in cols) + " |" for k, v in stats.items()]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    cfg = OmegaConf.merge(OmegaConf.structured(CorpusConfig), OmegaConf.from_cli(argv if argv is not None else sys.argv[1:]))
    out = build_corpus(OmegaConf.to_object(cfg))
    print(format_stats(out))


if __name__ == "__main__":
    main()
