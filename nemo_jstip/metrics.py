"""WER, entity accuracy and spoken-QA accuracy (JSTIP.md, "How results are measured"), and two systems' entity
mentions paired (McNemar), for comparisons that seed means alone cannot settle.

Normalisation is Whisper's English normaliser (lowercase, punctuation, spelled-out and written numbers alike),
WER is NeMo's ``word_error_rate_detail``. A reference entity mention is correct when its normalised words appear
contiguously in the normalised hypothesis; a QA answer is correct when any accepted answer does.
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
    from nemo.collections.asr.metrics.wer import word_error_rate_detail

    if not references:
        return {"wer": None, "words": 0}
    rate, words, ins, dels, subs = word_error_rate_detail(
        [normalize(h) for h in hypotheses], [normalize(r) for r in references]
    )
    return {"wer": rate, "words": words, "insertion_rate": ins, "deletion_rate": dels, "substitution_rate": subs}


def entity_mentions(rows: list[dict]) -> list[dict]:
    """One record per reference entity mention: ``rows`` have cut_id, hypothesis, entities, domain."""
    out = []
    for row in rows:
        for e in row.get("entities") or []:
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
    groups = defaultdict(list)
    for m in mentions:
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
    out["entity_accuracy"] = sum(m["correct"] for m in mentions) / len(mentions) if mentions else None
    out["entity_mentions"] = len(mentions)
    out["entity_accuracy_by_type"] = accuracy_by(mentions, "type")
    out["entity_accuracy_by_seen_in_text"] = accuracy_by([m for m in mentions if m["seen_in_text"] is not None], "seen_in_text")
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
        if [e["text"] for e in r.get("entities") or []] != [e["text"] for e in by_b[cid].get("entities") or []]:
            raise ValueError(f"cut {cid!r}: the two decodes list different reference entities")
    ids = sorted(by_a)
    ma, mb = (entity_mentions([by[c] for c in ids]) for by in (by_a, by_b))
    a_only = sum(x["correct"] and not y["correct"] for x, y in zip(ma, mb))
    b_only = sum(y["correct"] and not x["correct"] for x, y in zip(ma, mb))
    return {"mentions": len(ma), "a_only": a_only, "b_only": b_only, "p_value": sign_test(a_only, b_only)}
