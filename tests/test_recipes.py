"""Every recipe under conf/ composes with hydra, resolves, has the mixture it claims, and (on the tiny corpus)
gives a training batch through ``build_dataloader``. docs/recipes.md describes the recipes."""
import inspect
from itertools import islice
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from nemo_jstip.data.examples import add_special_tokens
from nemo_jstip.data.frames import FrameSpec
from nemo_jstip.data.interleave import InterleaveConfig
from nemo_jstip.data.nemo_types import build_dataloader
from nemo_jstip.prep.tokenizer import corpus_texts, train_tokenizer

CONF = Path(__file__).parents[1] / "conf"
GPU = ["pretrained.asr_nemo=/models/asr.nemo", "pretrained.hf_llm=/models/Llama-3.2-1B"]
FINETUNE = ["model.init_from_nemo=/models/stage1.nemo"]
RECIPES = {"jstip_tiny": [], "jstip_tiny_asr_finetune": FINETUNE, "jstip_gpu_1b": GPU, "jstip_repro": [],
           "jstip_smollm2": [], "jstip_demo": []}  # not the eval/transcribe scripts' configs
TRAIN = "{c}/general_train_cuts.jsonl"  # sources, {c} = data.corpus_dir
TEXT = ["{c}/medical_text.txt", "{c}/banking_text.txt"]
TTS = ["{c}/medical_textspeech_cuts.jsonl", "{c}/banking_textspeech_cuts.jsonl"]
# mixture -> (streams as (kind, weight, source), interleave mode or None when nothing is interleaved)
MIXTURES = {
    "asr_only": ([("asr", 1.0, TRAIN)], None),
    "joint": ([("asr", 1.0, TRAIN), ("text", 0.5, TEXT)], None),
    **{f"jstip_{mode}": ([("asr", 1.0, TRAIN), ("interleaved", 1.0, TRAIN), ("text", 0.5, TEXT)], mode)
       for mode in ("word", "segment", "mixed")},
    "jstip_synthetic": ([("asr", 1.0, TRAIN), ("interleaved", 1.0, TRAIN), ("asr", 0.25, TTS),
                         ("interleaved", 0.25, TTS)], "mixed"),
    "joint_transcripts": ([("asr", 1.0, TRAIN), ("text", 1.0, TRAIN), ("text", 0.5, TEXT)], None),
    "jstip_word_transcripts": ([("asr", 1.0, TRAIN), ("interleaved", 0.5, TRAIN), ("text", 0.5, TRAIN),
                                ("text", 0.5, TEXT)], "word"),
}
FAST = ["model.train_ds.loader.num_workers=0", "model.train_ds.sampler.num_buckets=1",
        "model.train_ds.sampler.max_tokens=2048"]


def recipe(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name=name, overrides=[*RECIPES[name], *overrides])
    OmegaConf.resolve(cfg)
    return cfg


def mandatory(name: str) -> str:
    """The key the recipe refuses to run without (a ``???`` value)."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name=name)
    with pytest.raises((MissingMandatoryValue, InterpolationToMissingValueError)) as error:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    return str(error.value)


def streams(cfg) -> list[tuple]:
    def source(e):
        return e.get("cuts_path", e.get("paths"))
    entries = OmegaConf.to_container(cfg.model.train_ds.input_cfg)
    return [(e.get("kind", "text"), e["weight"], source(e)) for e in entries]


def expected(mixture: str, corpus: str) -> list[tuple]:
    def fill(src):
        return src.format(c=corpus) if isinstance(src, str) else [s.format(c=corpus) for s in src]
    return [(kind, weight, fill(src)) for kind, weight, src in MIXTURES[mixture][0]]


def test_every_recipe_and_mixture_is_listed():
    assert {p.stem for p in CONF.glob("*.yaml")} - {"jstip_eval", "jstip_transcribe"} == set(RECIPES)
    assert {p.stem for p in (CONF / "mixture").glob("*.yaml")} == set(MIXTURES)


def test_demo_starts_from_committed_files():
    cfg = recipe("jstip_demo", "data.corpus_dir=/c")
    assert streams(cfg) == expected("jstip_word_transcripts", "/c")
    for path in (cfg.model.init_from_nemo, cfg.pretrained.hf_llm, cfg.pretrained.asr_encoder):
        assert (CONF.parent / path).exists(), path


@pytest.mark.parametrize("base", ["jstip_tiny", "jstip_gpu_1b"])
@pytest.mark.parametrize("mixture", sorted(MIXTURES))
def test_mixtures(base, mixture):
    cfg = recipe(base, f"mixture={mixture}", "data.corpus_dir=/c")
    assert streams(cfg) == expected(mixture, "/c")
    mode = MIXTURES[mixture][1]
    assert cfg.model.interleave.mode == (mode or "mixed")  # the base's default where nothing is interleaved
    assert "interleave" not in cfg.model.train_ds and "interleave" not in cfg.model.validation_ds  # model's
    assert cfg.model.validation_ds.input_cfg[0].cuts_path == "/c/general_dev_cuts.jsonl"


def test_default_mixture_and_domain_text_override(tmp_path):
    assert recipe("jstip_tiny") == recipe("jstip_tiny", "mixture=jstip_mixed")
    cfg = recipe("jstip_tiny", "data.corpus_dir=/c")
    assert cfg.model.tokenizer.path == "/c/tokenizer" and cfg.name == "jstip_tiny"
    own = str(tmp_path / "own.txt")
    for mixture in ("joint", "jstip_mixed", "jstip_word"):
        cfg = recipe("jstip_tiny", f"mixture={mixture}", f"data.domain_text={own}")
        assert [s for s in streams(cfg) if s[0] == "text"] == [("text", 0.5, own)]
    cfg = recipe("jstip_gpu_1b", f"data.domain_text=[{own},{own}]")
    assert [s for s in streams(cfg) if s[0] == "text"] == [("text", 0.5, [own, own])]


def test_finetune_recipe():
    cfg, base = recipe("jstip_tiny_asr_finetune"), recipe("jstip_tiny")
    assert streams(cfg) == streams(recipe("jstip_tiny", "mixture=asr_only"))
    assert cfg.model.init_from_nemo == "/models/stage1.nemo" and cfg.name == "jstip_tiny_asr_finetune"
    assert cfg.model.optim.lr < base.model.optim.lr
    for key in ("tokenizer", "perception", "llm", "interleave"):  # the stage-1 model's sections
        assert cfg.model[key] == base.model[key]
    assert "full_key: model.init_from_nemo" in mandatory("jstip_tiny_asr_finetune")


LLAMA_32_1B = dict(  # Llama-3.2-1B's config.json
    architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def config_only_nemo(path: Path, model_config: dict) -> Path:
    """A .nemo holding only its model_config.yaml: what deriving the perception config reads."""
    import io
    import tarfile

    import yaml

    data = yaml.safe_dump(model_config).encode()
    with tarfile.open(path, "w:") as t:
        info = tarfile.TarInfo("./model_config.yaml")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return path


def test_gpu_recipe(tmp_path):
    """The pretrained parts define the shapes: the recipe restates none, and its own keys fit Llama-3.2-1B and a
    FastConformer-L .nemo."""
    from nemo.collections.asr.modules import SpectrogramAugmentation
    from transformers import LlamaConfig

    from nemo_jstip.modules.hf_import import llm_config_from_hf, llm_section
    from nemo_jstip.modules.llm import LLMConfig
    from nemo_jstip.modules.perception import SpeechPerception
    from nemo_jstip.parallel.strategy import MegatronStrategy
    from tests.modules.test_pretrained import FASTCONFORMER

    cfg = recipe("jstip_gpu_1b")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.devices == 8 and cfg.trainer.accelerator == "gpu"
    assert set(cfg.strategy) <= set(inspect.signature(MegatronStrategy.__init__).parameters)
    assert cfg.model.llm.init_from_hf == "/models/Llama-3.2-1B" and cfg.model.tokenizer.path is None
    assert cfg.model.perception.init_from_nemo == "/models/asr.nemo"
    assert cfg.model.perception.encoder is None and cfg.model.perception.preprocessor is None
    LlamaConfig(**LLAMA_32_1B).save_pretrained(tmp_path / "llama")
    llm = OmegaConf.to_container(cfg.model.llm)
    derived = LLMConfig(**{k: v for k, v in llm_section({**llm, "init_from_hf": str(tmp_path / "llama")}).items()
                           if k != "init_from_hf"})
    assert derived == llm_config_from_hf(LlamaConfig(**LLAMA_32_1B), **{k: llm[k] for k in (
        "max_sequence_length", "layer_spec", "fp8", "fp8_recipe", "params_dtype", "train_mode")})
    assert derived.num_layers == 16 and derived.rope_scaling and derived.tie_embeddings
    large = {**FASTCONFORMER, "encoder": {**FASTCONFORMER["encoder"], "n_layers": 17, "d_model": 512, "n_heads": 8,
                                           "subsampling_conv_channels": 256}}
    nemo = config_only_nemo(tmp_path / "asr.nemo", large)
    perception = SpeechPerception.resolve_config({**OmegaConf.to_container(cfg.model.perception),
                                                  "init_from_nemo": str(nemo)})
    assert perception.encoder.d_model == 512 and perception.encoder.self_attention_model == "rel_pos"
    assert set(perception.spec_augment) <= set(inspect.signature(SpectrogramAugmentation.__init__).parameters)
    assert FrameSpec.from_config(perception).hop_seconds == pytest.approx(0.08)  # 80 ms per LLM frame
    assert "pretrained." in mandatory("jstip_gpu_1b")


def test_smollm2_recipe():
    """The confirmation recipe: SmolLM2-135M's shape (what HF import derives from its config.json) held by LoRA."""
    from transformers import LlamaConfig

    from nemo_jstip.modules.hf_import import llm_config_from_hf
    from nemo_jstip.modules.llm import LLMConfig

    cfg, repro = recipe("jstip_smollm2"), recipe("jstip_repro")
    assert cfg.model.tokenizer.path == cfg.model.llm.init_from_hf == "data/smollm2" and cfg.model.llm.train_mode == "lora"
    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64, vocab_size=49155, max_position_embeddings=8192,
                          rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    llm = {k: v for k, v in OmegaConf.to_container(cfg.model.llm).items() if k != "init_from_hf"}
    assert LLMConfig(**llm) == llm_config_from_hf(smollm2, **{k: llm[k] for k in (
        "max_sequence_length", "layer_spec", "train_mode")})
    assert streams(cfg) == streams(repro)
    assert cfg.model.perception == OmegaConf.merge(repro.model.perception, {"adapter": {"output_size": 576}})


@pytest.fixture(scope="module")
def tokenizer(tiny_corpus):
    tok = train_tokenizer(corpus_texts(tiny_corpus), vocab_size=300)
    add_special_tokens(tok, InterleaveConfig())
    return tok


def first_batches(cfg, tokenizer, n=1):
    from nemo_jstip.modules.perception import SpeechPerception

    data = {**cfg.model.train_ds, "interleave": cfg.model.interleave}  # as JSTIPModel passes it on
    frames = FrameSpec.from_config(SpeechPerception.resolve_config(cfg.model.perception))
    loader = build_dataloader(data, tokenizer, frames)
    return loader, list(islice(loader, n))


@pytest.mark.parametrize("name,mixture", [("jstip_tiny", m) for m in sorted(MIXTURES)]
                         + [("jstip_tiny_asr_finetune", "asr_only"), ("jstip_gpu_1b", "jstip_mixed")])
def test_recipes_give_a_batch(name, mixture, tiny_corpus, tokenizer, tmp_path):
    from tests.modules.test_pretrained import FASTCONFORMER

    overrides = [f"data.corpus_dir={tiny_corpus}", *FAST]
    if name == "jstip_gpu_1b":  # its encoder (frame rate) is the .nemo's
        overrides.append(f"pretrained.asr_nemo={config_only_nemo(tmp_path / 'asr.nemo', FASTCONFORMER)}")
    cfg = recipe(name, *overrides, *([f"mixture={mixture}"] if name == "jstip_tiny" else []))
    loader, (batch,) = first_batches(cfg, tokenizer)
    want = expected(mixture, str(tiny_corpus))
    assert [(s.kind, s.weight) for s in loader.sampler.streams] == [(k, w) for k, w, _ in want]
    assert loader.dataset.builder.cfg.mode == (MIXTURES[mixture][1] or "mixed")
    assert set(batch["kinds"]) <= {k for k, _, _ in want} and batch["problems"] == {}
    assert batch["audio"].shape[0] == sum(k != "text" for k in batch["kinds"])


def test_own_domain_text_is_the_only_text_source(tiny_corpus, tokenizer, tmp_path):
    own = tmp_path / "own.txt"
    lines = ["the pharmacist dispensed amoxicillin", "the teller opened a savings account"]
    own.write_text(f"{lines[0]}\n\n{lines[1]}\n")
    cfg = recipe("jstip_tiny", f"data.corpus_dir={tiny_corpus}", f"data.domain_text={own}", *FAST)
    loader, batches = first_batches(cfg, tokenizer, n=6)
    text = [(i, t) for b in batches for i, t, k in zip(b["cut_ids"], b["texts"], b["kinds"]) if k == "text"]
    assert text and {t for _, t in text} <= set(lines)
    assert all(i.startswith("domain_text:") for i, _ in text)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.txt: empty"):
        first_batches(recipe("jstip_tiny", f"data.corpus_dir={tiny_corpus}", f"data.domain_text={empty}", *FAST),
                      tokenizer)


def test_transcripts_control_reads_the_asr_transcripts_as_text(tiny_corpus, tokenizer):
    from lhotse import CutSet

    cfg = recipe("jstip_tiny", f"data.corpus_dir={tiny_corpus}", "mixture=joint_transcripts", *FAST)
    loader, batches = first_batches(cfg, tokenizer, n=6)
    transcripts = {" ".join(s.text for s in c.supervisions) for c in CutSet.from_file(cfg.data.train_cuts)}
    items = [(i, t) for b in batches for i, t, k in zip(b["cut_ids"], b["texts"], b["kinds"]) if k == "text"]
    ours = [t for i, t in items if i.startswith("transcripts:")]
    assert ours and set(ours) <= transcripts
    assert all(t not in transcripts for i, t in items if i.startswith("domain_text:"))
    assert all((0 if b["audio"] is None else b["audio"].shape[0]) == sum(k == "asr" for k in b["kinds"])
               for b in batches)
