import pytest

from nemo_jstip.prep.corpus import CorpusConfig, build_corpus

TINY_SIZES = {
    "general_train": 12,
    "general_dev": 4,
    "general_test": 4,
    "medical_text": 60,
    "medical_dev": 8,
    "medical_test": 12,
    "banking_text": 60,
    "banking_dev": 8,
    "banking_test": 12,
    "qa_test": 6,
    "medical_textspeech": 3,
    "banking_textspeech": 3,
    "medical_carrier": 3,
    "banking_carrier": 3,
    "general_words": 4,
}


def tiny_corpus_config(out_dir, **overrides) -> CorpusConfig:
    return CorpusConfig(**{"out_dir": str(out_dir), "sizes": dict(TINY_SIZES), **overrides})


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small embedded corpus (about 100 utterances, a few seconds to build), shared by the session."""
    cfg = tiny_corpus_config(tmp_path_factory.mktemp("corpus") / "tiny")
    return build_corpus(cfg)
