"""Fixtures shared by the whole test run: the tiny corpus; the tiny JSTIP setup (tokenizer, config, weights and two real batches, on
disk) that every model test builds from; and a real .nemo saved from it."""

import dataclasses

import pytest
import torch

from nemo_jstip.parallel.dist import spawn
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
    """A small embedded corpus (about 100 utterances, a few seconds to build), built once per test run."""
    cfg = tiny_corpus_config(tmp_path_factory.mktemp("corpus") / "tiny")
    return build_corpus(cfg)


# Small enough for 2 shared cores with up to 4 ranks; heads, query groups and the FFN divide by TP=2, layers by PP=2.
HF_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
PERCEPTION = {
    # dither and dropouts off: every layout must compute the same function (no RNG in the forward)
    "preprocessor": {"sample_rate": 16000, "features": 32, "window_size": 0.025, "window_stride": 0.01,
                     "n_fft": 512, "dither": 0.0},
    "encoder": {"feat_in": 32, "n_layers": 2, "d_model": 32, "n_heads": 2, "subsampling": "dw_striding",
                "subsampling_factor": 8, "subsampling_conv_channels": 32, "ff_expansion_factor": 2,
                "conv_kernel_size": 9, "dropout": 0.0, "dropout_pre_encoder": 0.0, "dropout_emb": 0.0,
                "dropout_att": 0.0},
    "adapter": {"type": "mlp", "stack": 1, "hidden_size": 64, "output_size": HF_SIZES["hidden_size"]},
}


@pytest.fixture(scope="session", autouse=True)
def _forkserver_preloads_the_model():
    """Have ``spawn``'s forkserver (started by the run's first spawn) import NeMo and the model once, so that
    each rank starts without ~10 s of imports (NeMo's)."""
    from nemo_jstip.parallel import dist

    saved = dist._PRELOAD
    dist._PRELOAD = [*saved, "nemo_jstip.models.jstip_model"]
    yield
    dist._PRELOAD = saved


@pytest.fixture(scope="session")
def parallel_setup(tiny_corpus, tmp_path_factory):
    """A tiny JSTIP setup on disk.

    Everything a rank needs is in one ``torch.save``d file, so every layout (TP, PP, DP) starts from the same
    weights and sees the same batches: a random tiny HF ``LlamaForCausalLM`` (vocabulary = the tokenizer's, JSTIP
    special tokens included) that each rank imports into its own TP shard / PP stage with ``load_hf_weights``, and
    one ``SpeechPerception`` state dict for the first stage.

    Path of a file with ``cfg`` (JSTIPModel config), ``hf`` (HF Llama state dict), ``perception`` (state dict)
    and ``batches`` (two JSTIPDataset batches from ``build_dataloader``: asr + interleaved + text items), and
    ``packed_batches`` (the same items packed, several per row)."""
    import transformers as T
    from lhotse import CutSet
    from omegaconf import OmegaConf

    from nemo_jstip.data.examples import add_special_tokens
    from nemo_jstip.data.frames import FrameSpec
    from nemo_jstip.data.interleave import InterleaveConfig
    from nemo_jstip.data.nemo_types import build_dataloader
    from nemo_jstip.data.sampler import MixedBatch
    from nemo_jstip.modules.hf_import import llm_config_from_hf
    from nemo_jstip.modules.perception import SpeechPerception
    from nemo_jstip.prep.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("parallel")
    corpus = tiny_corpus
    cuts = corpus / "general_train_cuts.jsonl"
    texts = [c.supervisions[0].text for c in CutSet.from_file(cuts)]
    texts += (corpus / "medical_text.txt").read_text().splitlines()
    tok = train_tokenizer(texts, 300, out / "tokenizer")
    interleave = {"mode": "mixed"}
    add_special_tokens(tok, InterleaveConfig(**interleave))  # what JSTIPModel does with the saved tokenizer

    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **HF_SIZES)).eval()
    with torch.no_grad():  # norms away from 1 so that their weights (and gradients) matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    llm = dataclasses.asdict(llm_config_from_hf(hf.config, layer_spec="local", train_mode="full"))
    llm["lora_targets"] = list(llm["lora_targets"])
    cfg = {"tokenizer": {"path": str(out / "tokenizer")}, "perception": PERCEPTION, "llm": llm,
           "interleave": interleave, "max_grad_norm": 0.5, "seed": 1234}
    perception = SpeechPerception(OmegaConf.create(PERCEPTION))

    data = {
        "input_cfg": [
            {"type": "jstip_cuts", "cuts_path": str(cuts), "kind": "asr", "repeat": True},
            {"type": "jstip_cuts", "cuts_path": str(cuts), "kind": "interleaved", "repeat": True},
            {"type": "jstip_text", "paths": str(corpus / "medical_text.txt"), "repeat": True},
        ],
        "interleave": interleave,
        "sampler": {"max_tokens": 480, "max_item_cost": 160, "num_buckets": 1, "seed": 0},
    }
    loader = build_dataloader(data, tok, FrameSpec.from_config(OmegaConf.create(PERCEPTION)))
    it = ((items, loader.dataset[items]) for items in loader.sampler)
    first = next(x for _, x in zip(range(50), it) if set(x[1]["kinds"]) == {"asr", "interleaved", "text"})
    second = next(x for x in it if x[1]["input_ids"].shape[1] != first[1]["input_ids"].shape[1]
                  and "asr" in x[1]["kinds"])
    batches = [first[1], second[1]]
    assert all(b["input_ids"].shape[0] > 1 and b["audio"].shape[0] > 0 for b in batches)
    # the same items packed into rows of 320 positions (several examples per row)
    packed = [loader.dataset[MixedBatch(items, items.epoch, items.index, pack_length=320)]
              for items, _ in (first, second)]
    assert all(b["input_ids"].shape[0] < len(b["kinds"]) for b in packed)

    path = out / "setup.pt"
    torch.save({"cfg": cfg, "hf": hf.state_dict(), "perception": perception.state_dict(), "batches": batches,
                "packed_batches": packed}, path)
    return path


def save_setup_model(setup_path, nemo_path) -> None:
    """Rank body: the setup's model (TP=PP=1), saved as a .nemo."""
    from tests.models.test_parallel import _build

    model, _ = _build(setup_path, 1, 1)
    model.save_to(nemo_path)


@pytest.fixture(scope="session")
def good_nemo(parallel_setup, tmp_path_factory):
    """A real .nemo (``parallel_setup``'s model saved by ``save_to``): the base of the malicious-file tests."""
    path = tmp_path_factory.mktemp("nemo") / "good.nemo"
    spawn(save_setup_model, 1, parallel_setup, str(path))
    return path
