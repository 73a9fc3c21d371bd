import numpy as np
import pytest
from lhotse import Recording, SupervisionSegment
from lhotse.audio import AudioSource
from lhotse.supervision import AlignmentItem

WORDS = (
    "the patient was given twenty milligrams of atorvastatin daily doctor patel prescribed metformin for "
    "diabetes account balance transfer savings loan interest rate card payment bank branch mortgage a an "
    "to and is on at by with in please check my statement yesterday morning evening blood pressure heart"
).split()


def random_sentence(rng, lo=1, hi=20):
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi + 1))))


@pytest.fixture(scope="session")
def _tokenizer_json():
    """A byte-level BPE (GPT-2 style: the space belongs to the next word) trained offline on generated text."""
    from nemo_jstip.prep.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    return train_tokenizer([random_sentence(rng) for _ in range(400)], vocab_size=400).backend_tokenizer.to_str()


def _wrap(tokenizer_json):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json), bos_token="<|bos|>", eos_token="<|eos|>"
    )


@pytest.fixture
def tokenizer(_tokenizer_json):
    """A fresh PreTrainedTokenizerFast without the JSTIP tokens (adding tokens mutates it)."""
    return _wrap(_tokenizer_json)


@pytest.fixture(scope="session")
def jstip_tokenizer(_tokenizer_json):
    """The tiny tokenizer with the audio placeholder and default speech markers added; do not mutate."""
    from nemo_jstip.data.examples import add_special_tokens
    from nemo_jstip.data.interleave import InterleaveConfig

    tok = _wrap(_tokenizer_json)
    add_special_tokens(tok, InterleaveConfig())
    return tok


@pytest.fixture(scope="session")
def vocabulary():
    """The words the tiny tokenizer was trained on."""
    return WORDS


@pytest.fixture(scope="session")
def make_cut():
    return _make_cut


def _make_cut(words, times, duration, offset=0.0, id="cut-0", sr=16000):
    """A MonoCut of ``duration`` s whose words sit at ``times`` (cut-relative s). With ``offset`` > 0 the cut
    is a window starting ``offset`` s into a longer recording, with alignment times recording-relative."""
    total = offset + duration + 1.0
    rec = Recording(
        id=f"rec-{id}", sources=[AudioSource(type="command", channels=[0], source="true")], sampling_rate=sr,
        num_samples=round(total * sr), duration=round(total * sr) / sr,
    )
    align = [AlignmentItem(w, round(s + offset, 6), round(e - s, 6)) for w, (s, e) in zip(words, times)]
    sup = SupervisionSegment(
        id=f"sup-{id}", recording_id=rec.id, start=offset, duration=duration, text=" ".join(words),
        alignment={"word": align}, custom={"domain": "general", "entities": []},
    )
    full = rec.to_cut()
    full.supervisions = [sup]
    cut = full.truncate(offset=offset, duration=duration)  # lhotse moves the supervision, not the word times
    cut.id = id
    return cut
