"""Prompt templates and text-instead-of-audio prompts (spoken QA and its text-input upper bound)."""
import pytest
from lhotse import CutSet
from lhotse.utils import fastcopy

from nemo_jstip.data.dataset import DatasetConfig, JSTIPDataset, make_cost_fn
from nemo_jstip.data.examples import ExampleBuilder
from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.interleave import InterleaveConfig
from nemo_jstip.data.sampler import KIND_KEY, TextItem

QA = "Question: {input}\nAnswer:"


@pytest.fixture(scope="module")
def builder(jstip_tokenizer) -> ExampleBuilder:
    return ExampleBuilder(jstip_tokenizer, FrameSpec(), InterleaveConfig())


@pytest.fixture(scope="module")
def questions(tiny_corpus) -> list:
    return [fastcopy(c, custom={KIND_KEY: "asr"}) for c in CutSet.from_file(tiny_corpus / "qa_test_cuts.jsonl")]


def test_plain_template_is_the_asr_and_text_prompt(builder, questions):
    cut = questions[0]
    assert builder.prompt(cut).input_ids.tolist() == builder.asr(cut, prompt_only=True).input_ids.tolist()
    assert builder.prompt("the loan").input_ids.tolist() == builder.text("the loan", prompt_only=True).input_ids.tolist()
    with pytest.raises(ValueError):
        DatasetConfig(prompt=True, prompt_template="no slot")


def test_template_around_speech_and_text(builder, questions):
    tok, ids, cut = builder.tokenizer, builder.ids, questions[0]
    q = cut.supervisions[0].text
    speech = builder.prompt(cut, QA)
    head, tail = tok("Question:", add_special_tokens=False)["input_ids"], tok("\nAnswer:", add_special_tokens=False)["input_ids"]
    T = builder.asr(cut, prompt_only=True).num_frames
    assert speech.input_ids.tolist() == [ids.bos, *head, ids.speech_start, *[ids.audio] * T, ids.speech_end, *tail]
    assert speech.audio_frame_index.tolist().count(-1) == len(speech.input_ids) - T and not speech.loss_mask.any()
    text = builder.prompt(q, QA)
    assert text.input_ids[0] == ids.bos and tok.decode(text.input_ids[1:]) == f"Question: {q}\nAnswer:"
    assert q == cut.supervisions[0].custom["question"]  # the corpus speaks exactly the question


def test_dataset_text_input_switch(builder, questions):
    cfg = DatasetConfig(prompt=True, prompt_template=QA, prompt_text_input=True)
    batch = JSTIPDataset(builder, cfg)[questions[:3] + [TextItem("t0", "the loan", {KIND_KEY: "text"})]]
    assert batch["audio"].shape[0] == 0 and (batch["audio_item"] == -1).all()  # no audio read at all
    assert batch["cut_ids"][:3] == [c.id for c in questions[:3]] and batch["kinds"] == ["text"] * 4
    assert batch["domains"][:3] == ["qa"] * 3 and batch["texts"][3] == "the loan"
    speech = JSTIPDataset(builder, DatasetConfig(prompt=True, prompt_template=QA))[questions[:3]]
    assert speech["audio"].shape[0] == 3 and speech["kinds"] == ["asr"] * 3
    for c, spoken in ((cfg, False), (DatasetConfig(prompt=True, prompt_template=QA), True)):
        cost, ds = make_cost_fn(builder, exact=True, prompt=c), JSTIPDataset(builder, c)
        assert all(cost(q) == ds.example(q).cost for q in questions)  # exact, so token budgets hold
        assert all((ds.example(q).num_frames > 0) == spoken for q in questions)
