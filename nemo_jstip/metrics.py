"""WER, entity accuracy and spoken-QA accuracy (docs/method.md#how-results-are-measured), and two systems' entity
mentions paired (McNemar), for comparisons that seed means alone cannot settle.

Normalisation is Whisper's English normaliser (lowercase, punctuation, spelled-out and written numbers alike),
WER is NeMo's ``word_error_rate_detail`` over the utterances that have a reference transcript (none: WER is None,
not computable). A reference entity mention (a string, or a ``{text, type, ...}`` dict) is correct when its
normalised words appear contiguously in the normalised hypothesis; a QA answer is correct when any accepted answer
does.
"""

from __future__ import annotations

from collections import defaultdict
from functools import lru_cache


@lru_cache(maxsize=1)
def _normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    return " ".join(_normalizer()(text).split())


def contains(hypothesis: str, phrase: str) -> bool:
    """``phrase``'s normalised words occur contiguously in the normalised ``hypothesis`` (word boundaries kept)."""
    phrase = normalize(phrase)
    return bool(phrase) and f" {phrase} " in f" {normalize(hypothesis)} "


def wer(references: list[str], hypotheses: list[str]) -> dict:
    """WER over the pairs whose reference has words after normalisation; ``utterances`` says how many that is."""
    from nemo.collections.asr.metrics.wer import word_error_rate_detail

    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return {"wer": None, "words": 0, "utterances": 0}
    rate, words, ins, dels, subs = word_error_rate_detail([h for _, h in pairs], [r for r, _ in pairs])
    return {"wer": rate, "words": words, "utterances": len(pairs), "insertion_rate": ins, "deletion_rate": dels,
            "substitution_rate": subs}


def entity_records(entities, where: str = "entities") -> list[dict]:
    """Reference entities as ``{text, type, ...}`` dicts: a plain string is an untyped entity (type None). Anything
    else is a ``ValueError`` naming ``where`` and the index."""
    if entities is None:
        return []
    if not isinstance(entities, (list, tuple)):
        raise ValueError(f"{where} must be a list of strings or {{text, type}} dicts, got {type(entities).__name__}")
    out = []
    for i, e in enumerate(entities):
        if isinstance(e, str) and e.strip():
            out.append({"text": e, "type": None})
        elif isinstance(e, dict) and isinstance(e.get("text"), str) and e["text"].strip():
            if e.get("type") is not None and not isinstance(e["type"], str):
                raise ValueError(f"{where}[{i}]['type'] must be a string, got {e['type']!r}")
            out.append({"type": None, **e})
        else:
            raise ValueError(f"{where}[{i}] must be a non-empty string or a dict with a non-empty 'text', got {e!r}")
    return out


def entity_mentions(rows: list[dict]) -> list[dict]:
    """One record per reference entity mention: ``rows`` have cut_id, hypothesis, entities, domain."""
    out = []
    for row in rows:
        for e in entity_records(row.get("entities"), f"cut {row['cut_id']}: entities"):
            out.append(
                {
                    "cut_id": row["cut_id"],
                    "domain": row.get("domain"),
                    "type": e["type"],
                    "entity": e["text"],
                    "seen_in_text": e.get("seen_in_text"),
                    "correct": contains(row["hypothesis"], e["text"]),
                    "hypothesis": row["hypothesis"],
                }
            )
    return out


def accuracy_by(mentions: list[dict], key: str) -> dict:
    """Accuracy per value of ``key``; mentions without one (an untyped entity) are left out."""
    groups = defaultdict(list)
    for m in mentions:
        if m[key] is not None:
            groups[str(m[key])].append(m["correct"])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def qa_correct(hypothesis: str | None, answers: list[str]) -> bool:
    return hypothesis is not None and any(contains(hypothesis, a) for a in answers)


def qa_summary(rows: list[dict]) -> dict:
    """Zero-shot spoken QA over the rows with ``answers``: ``answer`` came from the spoken question, ``answer_text``
    from the same question as text (the upper bound); an accuracy is None when nothing was asked that way."""
    qa = [r for r in rows if r.get("answers")]

    def acc(key):
        asked = [r for r in qa if r.get(key) is not None]
        return sum(qa_correct(r[key], r["answers"]) for r in asked) / len(asked) if asked else None

    return {"num_qa": len(qa), "qa_accuracy": acc("answer"), "qa_text_accuracy": acc("answer_text")}


def summarize(rows: list[dict]) -> dict:
    """The metrics of a decoded manifest: overall, per domain, per entity type, spoken QA (what metrics.json holds)."""
    mentions = entity_mentions(rows)
    out = {"num_utterances": len(rows), **wer([r["reference"] for r in rows], [r["hypothesis"] for r in rows])}
    out["wer_utterances"] = out.pop("utterances")
    if out["wer"] is None:
        out["wer_note"] = "not computable: no decoded utterance has a reference transcript"
    out["entity_accuracy"] = sum(m["correct"] for m in mentions) / len(mentions) if mentions else None
    out["entity_mentions"] = len(mentions)
    out["entity_accuracy_by_type"] = accuracy_by(mentions, "type")
    out["entity_accuracy_by_seen_in_text"] = accuracy_by(mentions, "seen_in_text")
    out.update(qa_summary(rows))
    domains = sorted({r["domain"] for r in rows if r.get("domain")})
    out["domains"] = {}
    for d in domains:
        sub = [r for r in rows if r.get("domain") == d]
        dm = [m for m in mentions if m["domain"] == d]
        out["domains"][d] = {
            "num_utterances": len(sub),
            "wer": wer([r["reference"] for r in sub], [r["hypothesis"] for r in sub])["wer"],
            "entity_accuracy": sum(m["correct"] for m in dm) / len(dm) if dm else None,
        }
    return out


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial (sign) test of ``wins`` vs ``losses`` at p = 1/2 (scipy's ``binomtest``): McNemar's
    exact test when they are the discordant pairs of a paired comparison. 1.0 when there are none."""
    from scipy.stats import binomtest

    return binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0


def paired_mentions(rows_a: list[dict], rows_b: list[dict]) -> dict:
    """The entity mentions of two decodes of the same cuts, paired: ``a_only`` / ``b_only`` are the mentions only one
    of them gets, ``p_value`` the exact McNemar test on those (whether A and B differ on *these* models beyond the
    luck of the mentions; seed-to-seed variation is not in it). Both must hold the same cuts and entities."""
    by_a, by_b = ({r["cut_id"]: r for r in rows} for rows in (rows_a, rows_b))
    if by_a.keys() != by_b.keys():
        diff = sorted(by_a.keys() ^ by_b.keys())
        raise ValueError(f"paired decodes differ in their cuts: {len(diff)} in one only, e.g. {diff[0]!r}")
    for cid, r in by_a.items():
        if [e["text"] for e in entity_records(r.get("entities"))] != [e["text"] for e in entity_records(by_b[cid].get("entities"))]:
            raise ValueError(f"cut {cid!r}: the two decodes list different reference entities")
    ids = sorted(by_a)
    ma, mb = (entity_mentions([by[c] for c in ids]) for by in (by_a, by_b))
    a_only = sum(x["correct"] and not y["correct"] for x, y in zip(ma, mb))
    b_only = sum(y["correct"] and not x["correct"] for x, y in zip(ma, mb))
    return {"mentions": len(ma), "a_only": a_only, "b_only": b_only, "p_value": sign_test(a_only, b_only)}
