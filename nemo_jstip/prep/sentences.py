"""Entity-annotated sentences from templates and word lists (nemo_jstip/prep/wordlists/*.yaml).

A template mixes literal words, `<filler>` slots (free word lists) and `{entity_type}` slots. Entity pools are
partitioned once per seed into groups, and each split draws from its own groups, so domain text, dev and test
overlap as a real domain would: some entities everywhere, some only in text and test (seen in text only),
some only in test (seen nowhere), some only in dev.

The 'carrier' split fills every entity slot from the domain's `generic` lists instead (the tablets, my bank, ten
pounds): a domain's everyday words (patient, transfer, twice a day) occur in broad general speech, its entities do
not. Such sentences join the general ASR data and carry no entity annotations.

Word sequences (``word_sequences``) of common English words (wordlists/common_words.txt) give the general ASR data
the breadth of a real corpus: thousands of words, so a model learns sounds-to-subwords rather than a closed
vocabulary, and can meet an unheard entity with more than a guess among the words it was trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from num2words import num2words

WORDLISTS = Path(__file__).parent / "wordlists"

# entity group -> the splits that may use it
GROUP_SPLITS = {
    "shared": ("text", "dev", "test"),
    "text_test": ("text", "test"),
    "text_dev": ("text", "dev"),
    "test_only": ("test",),
    "dev_only": ("dev",),
}
_SLOT = re.compile(r"(<\w+>|\{\w+\})")


@dataclass
class Sentence:
    words: list[str]
    entities: list[dict] = field(default_factory=list)  # text, type, start, end (word indices, end exclusive)

    @property
    def text(self) -> str:
        return " ".join(self.words)


def spoken_number(x: float) -> str:
    """20 -> 'twenty', 2.5 -> 'two point five', 1200 -> 'one thousand two hundred': transcript-style words."""
    return re.sub(r"[-,\s]+", " ", num2words(x, lang="en")).strip()


def load_domain(name: str) -> dict:
    with open(WORDLISTS / f"{name}.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def common_words() -> list[str]:
    """wordlists/common_words.txt: 4,000 common English words, most frequent first."""
    lines = (WORDLISTS / "common_words.txt").read_text(encoding="utf-8").splitlines()
    return [w for w in lines if w and not w.startswith("#")]


def domain_words(domain: dict) -> list[str]:
    """The words a domain's sentences use outside entity slots: templates, prefixes/suffixes, fillers."""
    parts = [t for t in domain["templates"] for t in _SLOT.split(t) if not t.startswith(("<", "{"))]
    parts += domain.get("prefixes", []) + domain.get("suffixes", [])
    parts += [v for values in domain.get("fillers", {}).values() for v in values]
    return list(dict.fromkeys(w for p in parts for w in p.split()))


def word_sequences(words: list[str], n: int, rng: np.random.Generator, lengths: tuple[int, int] = (4, 10),
                   forbidden: set[str] = frozenset()) -> list[Sentence]:
    """``n`` sentences of ``lengths`` random words each, every word used before any repeats (read word lists); a
    sentence that happens to contain a ``forbidden`` phrase is drawn again."""
    deck, out = _Deck(words, rng), []
    while len(out) < n:
        s = Sentence([deck.draw() for _ in range(int(rng.integers(lengths[0], lengths[1] + 1)))])
        if not any(f" {p} " in f" {s.text} " for p in forbidden):
            out.append(s)
    return out


def _generated_pool(spec: dict) -> list[str]:
    if spec["generate"] == "dose":
        return [f"{spoken_number(n)} {u}" for n in spec["numbers"] for u in spec["units"]]
    if spec["generate"] == "amount":
        out = []
        for n in spec["numbers"]:
            for c in sorted(set(spec["cents"])):
                out.append(f"{spoken_number(n)} dollars" + (f" and {spoken_number(c)} cents" if c else ""))
        return out
    raise ValueError(f"unknown entity generator {spec['generate']!r}")


def partition_entities(domain: dict, fractions: dict[str, float], rng: np.random.Generator) -> dict[str, dict[str, list[str]]]:
    """type -> group -> entities. Every group gets at least one entity of every type."""
    assert set(fractions) == set(GROUP_SPLITS), f"entity_groups must have exactly {sorted(GROUP_SPLITS)}"
    out = {}
    for etype, pool in domain.get("entities", {}).items():
        pool = _generated_pool(pool) if isinstance(pool, dict) else list(pool)
        if len(pool) < len(GROUP_SPLITS):
            raise ValueError(f"entity type {etype!r} needs at least {len(GROUP_SPLITS)} values, has {len(pool)}")
        pool = [pool[i] for i in rng.permutation(len(pool))]
        sizes = {g: max(1, int(round(fractions[g] * len(pool)))) for g in GROUP_SPLITS}
        sizes["shared"] = len(pool) - sum(v for g, v in sizes.items() if g != "shared")
        if sizes["shared"] < 1:
            raise ValueError(f"entity type {etype!r}: fractions leave no shared entities")
        groups, i = {}, 0
        for g in GROUP_SPLITS:
            groups[g] = pool[i : i + sizes[g]]
            i += sizes[g]
        out[etype] = groups
    return out


class _Deck:
    """Draws without replacement, reshuffling when empty: every value is used before any repeats."""

    def __init__(self, values: list[str], rng: np.random.Generator):
        self.values, self.rng, self.order = list(values), rng, []

    def draw(self) -> str:
        if not self.order:
            self.order = list(self.rng.permutation(len(self.values)))
        return self.values[self.order.pop()]


class SentenceGenerator:
    """Sentences of one domain for one split ('train', 'text', 'dev', 'test' or 'carrier')."""

    def __init__(self, domain: dict, partition: dict, split: str, rng: np.random.Generator):
        self.domain, self.rng = domain, rng
        self.templates = domain["templates"]
        self.carrier = split == "carrier"
        self.decks = {}
        for etype, groups in partition.items():
            if self.carrier:
                if etype not in domain.get("generic", {}):
                    raise ValueError(f"carrier sentences need generic values for entity type {etype!r}")
                values = domain["generic"][etype]
            else:
                values = [e for g, members in groups.items() if split in GROUP_SPLITS[g] for e in members]
            self.decks[etype] = _Deck(values, rng)
        self.template_deck = _Deck(list(range(len(self.templates))), rng)

    def _choice(self, values: list[str]) -> str:
        return values[int(self.rng.integers(len(values)))]

    def sample(self) -> Sentence:
        s = Sentence([])
        template = self.templates[self.template_deck.draw()]
        parts = [self._choice(self.domain["prefixes"])] if "prefixes" in self.domain else []
        parts += _SLOT.split(template)
        parts += [self._choice(self.domain["suffixes"])] if "suffixes" in self.domain else []
        for part in parts:
            if part.startswith("<"):
                s.words += self._choice(self.domain["fillers"][part[1:-1]]).split()
            elif part.startswith("{"):
                etype = part[1:-1]
                words = self.decks[etype].draw().split()
                if not self.carrier:
                    s.entities.append({"text": " ".join(words), "type": etype, "start": len(s.words),
                                       "end": len(s.words) + len(words)})
                s.words += words
            else:
                s.words += part.split()
        return s

    def sample_unique(self, n: int, exclude: set[str] = frozenset(), max_tries: int = 50) -> list[Sentence]:
        """n sentences, distinct from each other and from `exclude` (texts of other splits)."""
        out, seen = [], set(exclude)
        for _ in range(n):
            for _ in range(max_tries):
                s = self.sample()
                if s.text not in seen:
                    break
            else:
                raise RuntimeError(f"could not draw {n} distinct sentences; add templates or lower the size")
            seen.add(s.text)
            out.append(s)
        return out
