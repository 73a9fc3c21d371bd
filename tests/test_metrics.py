import pytest

from nemo_jstip.metrics import contains, normalize, paired_mentions, qa_correct, sign_test, summarize, wer


def test_normalisation_treats_spelled_and_written_numbers_alike():
    assert normalize("Doctor Patel, twenty-five milligrams!") == normalize("doctor patel 25 milligrams")


def test_contains_respects_word_boundaries():
    assert contains("give metformin now", "metformin")
    assert not contains("give metformins now", "metformin")
    assert contains("pay four hundred and twenty dollars today", "four hundred and twenty dollars")
    assert not contains("pay four hundred dollars", "four hundred and twenty dollars")


def test_wer_counts_errors_against_reference_words():
    out = wer(["a b c d"], ["a x c"])
    assert out["words"] == 4 and out["wer"] == pytest.approx(0.5)


def test_summary_per_domain_type_and_qa():
    rows = [
        {"cut_id": "1", "reference": "give metformin now", "hypothesis": "give metformin now", "domain": "medical",
         "entities": [{"text": "metformin", "type": "drug", "seen_in_text": True}]},
        {"cut_id": "2", "reference": "pay chase today", "hypothesis": "pay chaste today", "domain": "banking",
         "entities": [{"text": "chase", "type": "bank", "seen_in_text": False}]},
        {"cut_id": "3", "reference": "hello there", "hypothesis": "hello there", "domain": "general", "entities": []},
    ]
    s = summarize(rows)
    assert s["num_utterances"] == 3 and s["entity_mentions"] == 2 and s["entity_accuracy"] == 0.5
    assert s["entity_accuracy_by_type"] == {"bank": 0.0, "drug": 1.0}
    assert s["entity_accuracy_by_seen_in_text"] == {"False": 0.0, "True": 1.0}
    assert s["domains"]["medical"]["entity_accuracy"] == 1.0 and s["domains"]["general"]["entity_accuracy"] is None
    assert s["domains"]["banking"]["wer"] == pytest.approx(1 / 3)
    assert qa_correct("I think it is Paris.", ["paris"]) and not qa_correct("london", ["paris"])


def test_qa_accuracy_speech_and_text_input():
    qa = {"reference": "what is the capital of france", "domain": "qa", "entities": [], "answers": ["paris"]}
    rows = [
        {"cut_id": "q1", "hypothesis": "what is the capital of france", **qa, "answer": "Paris.", "answer_text": "paris"},
        {"cut_id": "q2", "hypothesis": "what is", **qa, "answers": ["seven", "7"], "answer": "six", "answer_text": "7"},
        {"cut_id": "q3", "hypothesis": "x", **qa, "answer": "", "answer_text": "it is paris"},
        {"cut_id": "a", "reference": "hello there", "hypothesis": "hello there", "domain": "general", "entities": []},
    ]
    s = summarize(rows)
    assert s["num_qa"] == 3 and s["num_utterances"] == 4  # QA cuts are transcribed too
    assert s["qa_accuracy"] == pytest.approx(1 / 3) and s["qa_text_accuracy"] == 1.0
    assert s["domains"]["qa"]["num_utterances"] == 3
    none = summarize(rows[3:])
    assert none["num_qa"] == 0 and none["qa_accuracy"] is None and none["qa_text_accuracy"] is None
    asked_by_speech_only = summarize([{k: v for k, v in rows[0].items() if k != "answer_text"}])
    assert asked_by_speech_only["qa_accuracy"] == 1.0 and asked_by_speech_only["qa_text_accuracy"] is None


def test_sign_test_is_exact_two_sided_binomial():
    assert sign_test(8, 1) == pytest.approx(20 / 512)  # 2 * (C(9,0) + C(9,1)) / 2**9
    assert sign_test(1, 8) == sign_test(8, 1)
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(20, 0) < 1e-5


def _decode(hyps: dict[str, str]) -> list[dict]:
    refs = {"a": ("give metformin to doctor osei", ["metformin", "doctor osei"]),
            "b": ("pay chase bank", ["chase bank"]), "c": ("hello there", [])}
    return [{"cut_id": c, "reference": refs[c][0], "hypothesis": h, "domain": "medical",
             "entities": [{"text": e, "type": "x"} for e in refs[c][1]]} for c, h in hyps.items()]


def test_paired_mentions_counts_the_discordant_mentions():
    a = _decode({"a": "give metformin to doctor o say", "b": "pay chase bank", "c": "hello there"})
    b = _decode({"c": "hello", "b": "pay chess bank", "a": "give met forming to doctor osei"})  # order does not matter
    out = paired_mentions(a, b)
    assert out == {"mentions": 3, "a_only": 2, "b_only": 1, "p_value": 1.0}
    with pytest.raises(ValueError, match="1 in one only, e.g. 'a'"):
        paired_mentions(a, b[:2])
    b[2]["entities"] = b[2]["entities"][:1]
    with pytest.raises(ValueError, match="cut 'a'.*different reference entities"):
        paired_mentions(a, b)


def test_entities_as_plain_strings_or_dicts():
    rows = [{"cut_id": "1", "reference": "give ramipril now", "hypothesis": "give ramipril now", "domain": "medical",
             "entities": ["ramipril", {"text": "now", "type": "time"}]},
            {"cut_id": "2", "reference": "", "hypothesis": "hello", "domain": "medical", "entities": ["hello"]}]
    s = summarize(rows)
    assert s["entity_mentions"] == 3 and s["entity_accuracy"] == 1.0
    assert s["entity_accuracy_by_type"] == {"time": 1.0}  # untyped mentions count overall only
    assert s["wer"] == 0.0 and s["wer_utterances"] == 1 and s["words"] == 3  # the cut without reference is left out
    with pytest.raises(ValueError, match=r"cut 1: entities\[0\] must be a non-empty string"):
        summarize([rows[0] | {"entities": [3]}])


def test_wer_without_any_reference_is_none():
    out = wer(["", "  "], ["a", "b"])
    assert out["wer"] is None and out["utterances"] == 0
    assert summarize([{"cut_id": "x", "reference": "", "hypothesis": "a"}])["wer_note"].startswith("not computable")
