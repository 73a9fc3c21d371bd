"""JSTIPDataset on the tiny real corpus: batch contract, gather indices, labels, padding, cost bound, resume, prompts."""
from itertools import islice

import pytest
import torch
from lhotse import CutSet
from lhotse.utils import fastcopy

from nemo_jstip.data.dataset import DatasetConfig, JSTIPDataset, make_cost_fn
from nemo_jstip.data.examples import IGNORE, ExampleBuilder, TokenIds
from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.interleave import InterleaveConfig
from nemo_jstip.data.sampler import KIND_KEY, InterleavingSampler, MixedBatch, Stream, TextItem, item_cost, pack_rows

SPEC = FrameSpec()
SPLITS = ("general_train", "medical_dev", "banking_dev", "medical_test")


@pytest.fixture(scope="module")
def cuts(tiny_corpus) -> CutSet:
    return CutSet([c for s in SPLITS for c in CutSet.from_file(tiny_corpus / f"{s}_cuts.jsonl")])


@pytest.fixture(scope="module")
def texts(tiny_corpus) -> list[str]:
    return (tiny_corpus / "medical_text.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def builder(jstip_tokenizer) -> ExampleBuilder:
    return ExampleBuilder(jstip_tokenizer, SPEC, InterleaveConfig())


def tag(cut, kind):
    return fastcopy(cut, custom={**(cut.custom or {}), KIND_KEY: kind})


def make_sampler(builder, cuts, texts, exact=True, **kw):
    streams = [Stream(cuts, "asr", 0.4), Stream(cuts, "interleaved", 0.4), Stream(texts, "text", 0.2, repeat=True)]
    cost = make_cost_fn(builder, exact=exact)
    opts = dict(max_tokens=1500, max_item_cost=300, num_buckets=2, num_items_for_edges_estimate=200, seed=1)
    sampler = InterleavingSampler(streams, cost, **{**opts, **kw})
    cost.follow(sampler)
    return sampler


@pytest.mark.parametrize("multiple", [1, 8, 16])
def test_batch_contract(builder, cuts, texts, multiple):
    ids = builder.ids
    dataset = JSTIPDataset(builder, DatasetConfig(pad_to_multiple=multiple))
    batches = [dataset[items] for items in islice(make_sampler(builder, cuts, texts), 3)]
    assert {k for b in batches for k in b["kinds"]} == {"asr", "interleaved", "text"}
    for b in batches:
        B, L = b["input_ids"].shape
        A = sum(k != "text" for k in b["kinds"])
        assert L % multiple == 0 and L - multiple < int(b["seq_lens"].max()) <= L
        for key in ("input_ids", "labels", "audio_item", "audio_frame"):
            assert b[key].dtype == torch.int64 and b[key].shape == (B, L), key
        assert b["loss_mask"].dtype == torch.float32 and b["loss_mask"].shape == (B, L)
        assert b["audio"].dtype == torch.float32 and b["audio"].shape == (A, int(b["audio_lens"].max()))
        assert b["audio_lens"].dtype == b["audio_num_frames"].dtype == b["seq_lens"].dtype == torch.int64
        assert b["audio_num_frames"].tolist() == [SPEC.num_frames(int(n)) for n in b["audio_lens"]]
        assert len(b["cut_ids"]) == len(b["kinds"]) == len(b["texts"]) == len(b["entities"]) == len(b["domains"]) == B
        assert b["position"] is not None and b["problems"] == {}

        pad = torch.arange(L)[None, :] >= b["seq_lens"][:, None]
        assert (b["input_ids"][pad] == dataset.pad_id).all() and (b["audio_item"][pad] == -1).all()
        assert (b["labels"][pad] == IGNORE).all() and (b["loss_mask"][pad] == 0).all()  # padding never has loss
        assert torch.equal(b["loss_mask"].bool(), b["labels"] != IGNORE)
        # labels are the next token, on text targets only (never audio, markers or BOS)
        r, t = torch.nonzero(b["labels"] != IGNORE, as_tuple=True)
        nxt = b["input_ids"][r, t + 1]
        assert torch.equal(b["labels"][r, t], nxt)
        assert not torch.isin(nxt, torch.tensor([ids.audio, ids.speech_start, ids.speech_end, ids.bos])).any()
        assert torch.equal(b["input_ids"] == ids.audio, b["audio_item"] >= 0)
        # audio rows: real audio up to audio_lens, zeros after
        for a, n in enumerate(b["audio_lens"].tolist()):
            assert b["audio"][a, :n].abs().sum() > 0 and not b["audio"][a, n:].any()
        s = b["token_stats"]
        assert s["real_tokens"] == int(b["seq_lens"].sum()) and s["padded_tokens"] == B * L
        assert s["loss_tokens"] == int(b["loss_mask"].sum()) and s["audio_tokens"] == int((b["audio_item"] >= 0).sum())
        assert sum(s[k] for k in ("asr", "interleaved", "text") if k in s) == B


@pytest.mark.parametrize("multiple", [1, 16])
def test_packed_batch_holds_each_example_as_alone(builder, cuts, texts, multiple):
    """A packed batch: several examples per row, in the sampler's rows, each example's ids, labels, audio positions
    and frames exactly those of the same example unpacked; ``segment_ids`` marks them (-1 on padding)."""
    dataset = JSTIPDataset(builder, DatasetConfig(pad_to_multiple=multiple))
    for items in islice(make_sampler(builder, cuts, texts, pack=True), 4):
        packed, alone = dataset[items], dataset[MixedBatch(items, items.epoch, items.index)]
        B, L = packed["input_ids"].shape
        assert items.pack_length == 300 and L <= 300 + multiple and L % multiple == 0
        assert B == max(pack_rows([item_cost(it) for it in items], 300)) + 1 < len(items)
        assert packed["cut_ids"] == alone["cut_ids"] and torch.equal(packed["audio"], alone["audio"])
        seg = packed["segment_ids"]
        assert torch.equal(seg >= 0, torch.arange(L)[None, :] < packed["seq_lens"][:, None])
        for e in range(len(items)):
            n = int(alone["seq_lens"][e])
            assert int((seg == e).sum()) == n  # one contiguous run in one row
            r, t = torch.nonzero(seg == e, as_tuple=True)
            assert (r == r[0]).all() and torch.equal(t, t[0] + torch.arange(n))
            for key in ("input_ids", "labels", "audio_item", "audio_frame", "loss_mask"):
                assert torch.equal(packed[key][r, t], alone[key][e, :n]), key
        s, a = packed["token_stats"], alone["token_stats"]
        assert s["real_tokens"] == a["real_tokens"] and s["padded_tokens"] == B * L < a["padded_tokens"]


def test_gather_selects_the_planned_frames(builder, cuts, texts):
    """enc[audio_item[m], audio_frame[m]] puts exactly Example.audio_frame_index of the right cut at each placeholder."""
    dataset = JSTIPDataset(builder, DatasetConfig(pad_to_multiple=4, load_audio=False))
    sampler = make_sampler(builder, cuts, texts)
    sampler.set_epoch(3)
    for items in islice(sampler, 4):
        b = dataset[items]
        A, T = len(b["audio_lens"]), int(b["audio_num_frames"].max())
        enc = torch.stack(torch.meshgrid(torch.arange(A), torch.arange(T), indexing="ij"), -1)  # enc[a, f] = (a, f)
        m = b["audio_item"] >= 0
        assert (b["audio_frame"][m] < b["audio_num_frames"][b["audio_item"][m]]).all()  # inside the real output
        got = torch.full((*b["input_ids"].shape, 2), -1, dtype=torch.int64)
        got[m] = enc[b["audio_item"][m], b["audio_frame"][m]]  # the model's splice
        speech_rows = [i for i, it in enumerate(items) if b["kinds"][i] != "text"]
        for i, item in enumerate(items):
            ex = dataset.example(item, items.epoch)
            assert ex.id == b["cut_ids"][i] and ex.kind == b["kinds"][i]
            n = len(ex.input_ids)
            assert torch.equal(b["input_ids"][i, :n], torch.from_numpy(ex.input_ids))
            assert torch.equal(b["labels"][i, :n], torch.from_numpy(ex.labels))
            frames = torch.from_numpy(ex.audio_frame_index)
            assert torch.equal(got[i, :n, 1], frames)
            row = speech_rows.index(i) if i in speech_rows else -1
            assert (got[i, :n, 0][frames >= 0] == row).all()
            if ex.kind == "asr":
                assert ex.num_frames == int(b["audio_num_frames"][row])


def test_cost_bounds_every_item_of_the_corpus(builder, cuts, texts):
    bound, exact = make_cost_fn(builder), make_cost_fn(builder, exact=True)

    class Epoch:
        epoch = 0

    exact.follow(Epoch)
    dataset = JSTIPDataset(builder)
    items = [TextItem(f"t{i}", t, {KIND_KEY: "text"}) for i, t in enumerate(texts)]
    items += [tag(c, k) for c in cuts for k in ("asr", "interleaved")]
    for epoch in range(4):
        Epoch.epoch = epoch
        for item in items:
            ex = dataset.example(item, epoch)
            assert bound(item) >= ex.cost, (item.id, epoch)
            assert exact(item) == ex.cost
            if item.custom[KIND_KEY] == "interleaved":
                assert bound(item) > ex.cost  # the ASR cost is a strict bound, as the docstring argues
    prompt = JSTIPDataset(builder, DatasetConfig(prompt=True))
    assert all(bound(tag(c, "asr")) > prompt.example(tag(c, "asr")).cost for c in cuts)


def test_resume_through_dataloader_gives_identical_batches(builder, cuts, texts):
    dataset = JSTIPDataset(builder, DatasetConfig(pad_to_multiple=8))

    def loader(sampler):
        return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=2,
                                           prefetch_factor=2, collate_fn=lambda x: x)

    def key(b):
        return b["cut_ids"], b["input_ids"], b["labels"], b["audio_item"], b["audio_frame"], b["audio"]

    total, cut_at = 10, 4
    small = dict(max_tokens=600)
    reference = make_sampler(builder, cuts, texts, **small)
    reference.set_epoch(1)
    full = [key(b) for b in islice(loader(reference), total)]
    assert len(full) == total

    s = make_sampler(builder, cuts, texts, **small)
    s.set_epoch(1)
    it = iter(loader(s))
    for _ in range(cut_at):
        s.mark_consumed(next(it)["position"])
    state = s.state_dict()
    assert s.batches_yielded > cut_at  # the workers prefetched ahead
    del it

    resumed = make_sampler(builder, cuts, texts, **small)
    resumed.load_state_dict(state)
    rest = [key(b) for b in islice(loader(resumed), total - cut_at)]
    for a, b in zip(rest, full[cut_at:], strict=True):
        assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))


def test_prompt_mode_left_pads(builder, cuts, texts):
    dataset = JSTIPDataset(builder, DatasetConfig(prompt=True, pad_to_multiple=8))
    items = [tag(c, "asr") for c in cuts.subset(first=5)] + [TextItem("t0", texts[0], {KIND_KEY: "text"})]
    b = dataset[items]
    assert "labels" not in b and "loss_mask" not in b
    B, L = b["input_ids"].shape
    assert L % 8 == 0 and torch.equal(b["prompt_lens"], b["seq_lens"])
    for i, item in enumerate(items):
        n = int(b["prompt_lens"][i])
        real = torch.arange(L) >= L - n  # left padding: each prompt ends at position L - 1
        assert torch.equal(b["attention_mask"][i], real)
        assert (b["input_ids"][i, ~real] == dataset.pad_id).all() and (b["audio_item"][i, ~real] == -1).all()
        assert b["position_ids"][i, real].tolist() == list(range(n))
        ids = b["input_ids"][i, real]
        if i < 5:  # BOS <speech_start> <audio> x T <speech_end>, the ASR example up to its transcript
            full = builder.asr(item)
            assert ids.tolist() == full.input_ids[:n].tolist() and ids[-1] == builder.ids.speech_end
            assert n == 3 + full.num_frames == 3 + int(b["audio_num_frames"][i])
            assert torch.equal(b["audio_frame"][i, real][ids == builder.ids.audio], torch.arange(full.num_frames))
            assert (b["audio_item"][i, real][ids == builder.ids.audio] == i).all()
        else:  # BOS text
            assert ids[0] == builder.ids.bos and builder.tokenizer.decode(ids[1:]) == texts[0]
    assert b["texts"][:5] == [" ".join(c.supervisions[0].text.split()) for c in cuts.subset(first=5)]


def test_prompt_only_examples(builder, cuts):
    cut = cuts[0]
    ids = TokenIds.from_tokenizer(builder.tokenizer, builder.cfg)
    prompt, full = builder.asr(cut, prompt_only=True), builder.asr(cut)
    assert prompt.input_ids.tolist() == full.input_ids[: 3 + full.num_frames].tolist()
    assert not prompt.loss_mask.any() and prompt.input_ids[-1] == ids.speech_end and prompt.num_text_tokens == 0
    text = builder.text("the loan", prompt_only=True)
    assert text.input_ids[0] == ids.bos and text.input_ids[-1] != ids.eos and not text.loss_mask.any()
    nomark = ExampleBuilder(builder.tokenizer, SPEC, InterleaveConfig(markers=False)).asr(cut, prompt_only=True)
    assert nomark.input_ids.tolist() == [ids.bos] + [ids.audio] * full.num_frames


def test_bookkeeping_fields(builder, cuts, tiny_corpus):
    dataset = JSTIPDataset(builder, DatasetConfig(load_audio=False))
    test = CutSet.from_file(tiny_corpus / "medical_test_cuts.jsonl").subset(first=4)
    b = dataset[[tag(c, "interleaved") for c in test]]
    assert b["audio"] is None and b["domains"] == ["medical"] * 4 and b["position"] is None
    assert b["entities"] == [c.supervisions[0].custom["entities"] for c in test]
    assert any(b["entities"]) and b["cut_ids"] == [c.id for c in test]
    # plain, untagged cuts (any Lhotse sampler) are ASR items
    assert dataset[list(test)]["kinds"] == ["asr"] * 4


def test_workers_do_not_deadlock_in_tokenizers(builder, cuts, texts, monkeypatch):
    """Importing NeMo sets TOKENIZERS_PARALLELISM=True; then HF tokenizers keep their rayon pool on in forked
    workers, and a worker's first encode hangs once the parent has encoded in parallel. The dataset turns it off."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    builder.tokenizer([" the bank loan"] * 500)  # a parallel encode in the parent: the pool is up
    dataset = JSTIPDataset(builder, DatasetConfig(load_audio=False))
    loader = torch.utils.data.DataLoader(dataset, sampler=make_sampler(builder, cuts, texts, max_tokens=600),
                                         batch_size=None, num_workers=2, collate_fn=lambda x: x, timeout=60)
    assert len(list(islice(loader, 4))) == 4
