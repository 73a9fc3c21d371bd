"""NeMo input_cfg types (registration, NeMo's reader) and build_dataloader from the YAML in docs/data.md."""
import importlib
import re
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo.collections.common.data.lhotse import cutset as nemo_cutset
from nemo_jstip.data import nemo_types
from nemo_jstip.data.dataset import DatasetConfig, JSTIPDataset
from nemo_jstip.data.examples import ExampleBuilder
from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.interleave import InterleaveConfig
from nemo_jstip.data.sampler import KIND_KEY, InterleavingSampler

DOCS = Path(__file__).parents[2] / "docs" / "data.md"


def docs_config(corpus: Path):
    """The ``train_ds`` YAML block of docs/data.md, pointed at ``corpus``."""
    block = re.search(r"```yaml\n(train_ds:.*?)```", DOCS.read_text(), flags=re.S).group(1)
    return OmegaConf.create(block.replace("data/demo_corpus", str(corpus))).train_ds


def test_registration_is_idempotent():
    types = nemo_cutset.KNOWN_DATA_CONFIG_TYPES
    assert types["jstip_cuts"] is nemo_types.read_jstip_cuts and types["jstip_text"] is nemo_types.read_jstip_text
    before = set(types)
    nemo_types.register()
    module = importlib.reload(nemo_types)  # a second import re-registers its own functions
    assert set(types) == before and types["jstip_cuts"] is module.read_jstip_cuts
    foreign = lambda config: None  # noqa: E731
    foreign.__module__ = "someone_else"
    types["jstip_text"] = foreign
    try:
        with pytest.raises(RuntimeError, match="already registered by someone_else"):
            module.register()
    finally:
        types["jstip_text"] = module.read_jstip_text


def test_nemo_reads_our_types(tiny_corpus, jstip_tokenizer):
    cfg = {"input_cfg": [
        {"type": "jstip_cuts", "cuts_path": str(tiny_corpus / "general_train_cuts.jsonl"), "kind": "interleaved",
         "weight": 0.5},
        {"type": "jstip_text", "paths": str(tiny_corpus / "medical_text.txt"), "weight": 0.5},
    ], "force_finite": True, "shard_seed": 0}
    cuts, is_tarred = nemo_cutset.read_cutset_from_config(cfg)
    items = list(cuts)
    kinds = Counter(x.custom[KIND_KEY] for x in items)
    lines = [ln for ln in (tiny_corpus / "medical_text.txt").read_text().splitlines() if ln.strip()]
    n_train = len((tiny_corpus / "general_train_cuts.jsonl").read_text().splitlines())
    assert not is_tarred and kinds["interleaved"] == n_train and kinds["text"] > 0
    assert all(x.text == x.text.strip() and x.text in lines for x in items if x.custom[KIND_KEY] == "text")
    with pytest.raises(ValueError, match=re.escape("kind: asr | interleaved | text, got 'speech'")):
        nemo_types.read_jstip_cuts(OmegaConf.create({"cuts_path": "x.jsonl", "kind": "speech"}))
    # the dataset takes NeMo's items as they come (e.g. behind NeMo's own samplers): tagged cuts, TextExample
    dataset = JSTIPDataset(ExampleBuilder(jstip_tokenizer, FrameSpec(), InterleaveConfig()), DatasetConfig(load_audio=False))
    batch = dataset[items[:12]]
    assert Counter(batch["kinds"]) == Counter(x.custom[KIND_KEY] for x in items[:12]) and batch["problems"] == {}
    # kind: text, the transcripts without their audio (the transcript-text control)
    text_cfg = {"input_cfg": [{"type": "jstip_cuts", "cuts_path": str(tiny_corpus / "general_train_cuts.jsonl"),
                               "kind": "text"}], "force_finite": True, "shard_seed": 0}
    cuts = list(nemo_cutset.read_cutset_from_config(text_cfg)[0])[:5]
    batch = dataset[cuts]
    assert batch["kinds"] == ["text"] * 5 and batch["audio"] is None and batch["problems"] == {}
    assert batch["texts"] == [" ".join(s.text for s in c.supervisions) for c in cuts]


def test_build_dataloader_from_the_docs_yaml(tiny_corpus, jstip_tokenizer):
    cfg = docs_config(tiny_corpus)
    cfg.sampler.num_buckets, cfg.sampler.max_tokens, cfg.loader.num_workers = 2, 600, 0  # tiny corpus, fast
    loader = nemo_types.build_dataloader(cfg, jstip_tokenizer, FrameSpec(), dp_rank=0, dp_world_size=1)
    sampler = loader.sampler
    assert isinstance(sampler, InterleavingSampler) and loader.dataset.cfg == DatasetConfig(**cfg.dataset)
    assert [(s.kind, s.weight, s.repeat) for s in sampler.streams] == [
        ("asr", 0.4, False), ("interleaved", 0.4, False), ("text", 0.2, True)]
    batches = list(islice(loader, 3))
    for b in batches:
        sampler.mark_consumed(b["position"])
        assert b["audio"].shape[0] == sum(k != "text" for k in b["kinds"]) and b["problems"] == {}
    assert {k for b in batches for k in b["kinds"]} == {"asr", "interleaved", "text"}
    assert any(i.startswith("domain_text:") for b in batches for i in b["cut_ids"])
    assert sampler.state_dict()["consumed"] == 3
    # the interleaved costs are exact: the sampler's budget is the real padded size
    for b, items in zip(batches, islice(nemo_types.build_dataloader(cfg, jstip_tokenizer, FrameSpec()).sampler, 3)):
        assert b["token_stats"]["padded_tokens"] == items.padded_tokens <= cfg.sampler.max_tokens


def test_build_dataloader_reads_nemo_types_and_rejects_bad_keys(tiny_corpus, jstip_tokenizer):
    cfg = OmegaConf.create({
        "input_cfg": [
            {"type": "lhotse", "cuts_path": str(tiny_corpus / "medical_dev_cuts.jsonl"), "kind": "asr"},
            {"type": "txt", "paths": str(tiny_corpus / "banking_text.txt"), "language": "en", "weight": 0.5},
        ],
        "sampler": {"max_tokens": 2000, "num_buckets": 1},
        "dataset": {"load_audio": False},
    })
    kinds = Counter(k for b in nemo_types.build_dataloader(cfg, jstip_tokenizer, FrameSpec()) for k in b["kinds"])
    assert kinds["asr"] == 8 and kinds["text"] > 0
    for bad, match in [({"samplr": {}}, "unknown data config keys"), ({"loader": {"workers": 2}}, "unknown loader"),
                       ({"input_cfg": [{"type": "group", "input_cfg": []}]}, "nested groups"),
                       ({"input_cfg": [{"type": "lhotse", "cuts_path": "x"}]}, "kind must be one of")]:
        with pytest.raises(ValueError, match=match):
            nemo_types.build_dataloader(OmegaConf.merge(cfg, bad), jstip_tokenizer, FrameSpec())


def test_extra_input_cfg_appends_a_stream_read_by_nemos_txt_jsonl(tiny_corpus, jstip_tokenizer, tmp_path):
    """A replay stream every mixture gets: NeMo's txt_jsonl without language/text_field, multi-line texts whole."""
    import json

    replay = tmp_path / "replay.jsonl"
    qa = ["Question: what is the capital of france\nAnswer: paris", "Question: what is two plus two\nAnswer: four"]
    replay.write_text("".join(json.dumps({"text": t, "source": "qa"}) + "\n" for t in qa))
    cfg = OmegaConf.create({
        "input_cfg": [{"type": "lhotse", "cuts_path": str(tiny_corpus / "medical_dev_cuts.jsonl"), "kind": "asr"}],
        "extra_input_cfg": [{"type": "txt_jsonl", "paths": str(replay), "weight": 0.5, "repeat": True, "name": "replay"}],
        "sampler": {"max_tokens": 2000, "num_buckets": 1},
        "dataset": {"load_audio": False},
    })
    loader = nemo_types.build_dataloader(cfg, jstip_tokenizer, FrameSpec())
    assert [(s.kind, s.weight, s.name) for s in loader.sampler.streams][1] == ("text", 0.5, "replay")
    assert sorted(set(loader.sampler.streams[1].source)) == sorted(qa)  # the newline inside a text survives
    texts = [t for b in loader for t, k in zip(b["texts"], b["kinds"]) if k == "text"]
    assert texts and set(texts) <= set(qa)


def test_jstip_text_takes_a_file_or_a_list_and_names_missing_empty_or_non_utf8_files(tmp_path):
    a, b, blank, latin = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "blank.txt", tmp_path / "latin1.txt"
    a.write_text("first sentence\n\n  second sentence  \n")
    b.write_text("third\n")
    blank.write_text("\n  \n")
    latin.write_bytes("caf\u00e9 ok\nna\u00efve patient\n".encode("utf-8") + "r\u00e9sum\u00e9\n".encode("latin-1"))

    def read(paths):
        return [x.text for x in nemo_types.read_jstip_text(OmegaConf.create({"paths": paths}))[0]]

    assert read(str(a)) == ["first sentence", "second sentence"]
    assert read([str(a), str(b)]) == ["first sentence", "second sentence", "third"]
    for k in range(3):  # text shards named with NeMo's brace pattern
        (tmp_path / f"shard_{k}.txt").write_text(f"shard {k} line\n")
    assert read(str(tmp_path / "shard__OP_0..2_CL_.txt")) == ["shard 0 line", "shard 1 line", "shard 2 line"]
    for paths, error, match in [(str(tmp_path / "nope.txt"), FileNotFoundError, "nope.txt: no such file"),
                                ([str(a), str(blank)], ValueError, "blank.txt: empty"),
                                ([str(a), str(latin)], ValueError, r"latin1.txt:3: not UTF-8 text \(byte b'\\xe9' at column 2\)"),
                                (None, ValueError, "needs paths"), ([], ValueError, "needs paths")]:
        with pytest.raises(error, match=match):
            nemo_types.read_jstip_text(OmegaConf.create({"paths": paths}))
