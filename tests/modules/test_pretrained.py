"""Pretrained parts define themselves: ``perception.init_from_nemo`` gives the preprocessor and encoder of a NeMo ASR
.nemo (CTC, RNNT), ``llm.init_from_hf`` the LLM's shape (Llama 3, Qwen3). The files are tiny and random but have the
released models' config shapes (FastConformer-L: 80 mels, rel_pos, xscaling, untie_biases, full attention context;
Llama-3.2: llama3 RoPE scaling, tied embeddings, GQA; Qwen3: q/k norms, head_dim != hidden / heads)."""

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nemo_jstip.checkpoint import NemoCheckpointError
from nemo_jstip.modules.hf_import import HF_DEFAULTS, HF_FIXED, llm_config_from_hf, llm_section
from nemo_jstip.modules.perception import SpeechPerception

LABELS = list(" abcdefghijklmnopqrstuvwxyz'")
_M = "nemo.collections.asr.modules."
# NeMo's fast-conformer configs (FastConformer-L), at d_model 64 and 2 layers
FASTCONFORMER = {
    "preprocessor": {"_target_": _M + "AudioToMelSpectrogramPreprocessor", "sample_rate": 16000,
                     "normalize": "per_feature", "window_size": 0.025, "window_stride": 0.01, "window": "hann", "features": 80, "n_fft": 512,
                     "log": True, "frame_splicing": 1, "dither": 1e-5, "pad_to": 0, "pad_value": 0.0},
    "spec_augment": {"_target_": _M + "SpectrogramAugmentation", "freq_masks": 2, "time_masks": 10, "freq_width": 27,
                     "time_width": 0.05},
    "encoder": {"_target_": _M + "ConformerEncoder", "feat_in": 80, "feat_out": -1, "n_layers": 2, "d_model": 64,
                "subsampling": "dw_striding", "subsampling_factor": 8, "subsampling_conv_channels": 64,
                "causal_downsampling": False, "ff_expansion_factor": 4, "self_attention_model": "rel_pos", "n_heads": 4,
                "att_context_size": [-1, -1], "xscaling": True, "untie_biases": True, "pos_emb_max_len": 5000,
                "conv_kernel_size": 9, "conv_norm_type": "batch_norm", "conv_context_size": None, "dropout": 0.1,
                "dropout_pre_encoder": 0.1, "dropout_emb": 0.0, "dropout_att": 0.1},
}
HEADS = {
    "ctc": {"decoder": {"_target_": _M + "ConvASRDecoder", "feat_in": 64, "num_classes": len(LABELS),
                        "vocabulary": LABELS}},
    "rnnt": {"model_defaults": {"enc_hidden": 64, "pred_hidden": 32, "joint_hidden": 32},
             "decoder": {"_target_": _M + "RNNTDecoder", "normalization_mode": None, "random_state_sampling": False,
                         "blank_as_pad": True, "prednet": {"pred_hidden": 32, "pred_rnn_layers": 1, "dropout": 0.0}},
             "joint": {"_target_": _M + "RNNTJoint", "log_softmax": None, "preserve_memory": False,
                       "fuse_loss_wer": False, "fused_batch_size": -1,
                       "jointnet": {"joint_hidden": 32, "activation": "relu", "dropout": 0.0, "encoder_hidden": 64,
                                    "pred_hidden": 32}},
             "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": 10}}},
}


def asr_nemo(kind: str, path: Path, seed: int = 0):
    """A NeMo ASR model (``EncDecCTCModel`` / ``EncDecRNNTModel``) saved by NeMo's own ``save_to``; returns it."""
    from nemo.collections.asr.models import EncDecCTCModel, EncDecRNNTModel

    torch.manual_seed(seed)
    cls = {"ctc": EncDecCTCModel, "rnnt": EncDecRNNTModel}[kind]
    model = cls(cfg=OmegaConf.create({"sample_rate": 16000, "labels": LABELS, **FASTCONFORMER, **HEADS[kind]}))
    with torch.no_grad():  # batch-norm statistics away from their initial values: the loaded buffers matter
        for name, b in model.encoder.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                b.add_(torch.rand_like(b))
    model.save_to(str(path))
    return model.eval()


def hf_folder(kind: str, path: Path, texts=None):
    """A random HF model folder (config.json, model.safetensors, tokenizer files) of a released model's config shape."""
    import transformers as T

    from nemo_jstip.prep.tokenizer import train_tokenizer

    texts = texts or [f"the patient took {n} milligrams of drug number {n * 7}" for n in range(200)]
    tok = train_tokenizer(texts, 300, path)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    torch.manual_seed(1)
    if kind == "llama3":  # Llama-3.2-1B's
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
        model = T.LlamaForCausalLM(T.LlamaConfig(**common, head_dim=16, max_position_embeddings=131072,
                                                 tie_word_embeddings=True, rope_parameters=rope))
    elif kind == "qwen3":  # Qwen3-0.6B's
        model = T.Qwen3ForCausalLM(T.Qwen3Config(**common, head_dim=32, max_position_embeddings=40960,
                                                 tie_word_embeddings=True,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model.eval()


@pytest.fixture(scope="module", params=["ctc", "rnnt"])
def asr(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}.nemo"
    return asr_nemo(request.param, path), path


ADAPTER = {"type": "mlp", "stack": 1, "hidden_size": 32, "output_size": 48}


def test_init_from_nemo_alone_defines_the_encoder(asr):
    """Built from the .nemo's path alone, the perception's encoder computes what the ASR model's encoder computes."""
    model, path = asr
    cfg = SpeechPerception.resolve_config({"init_from_nemo": str(path), "adapter": ADAPTER, "freeze_encoder": True})
    for section in ("preprocessor", "encoder"):
        theirs = {k: v for k, v in FASTCONFORMER[section].items() if k != "_target_"}
        assert OmegaConf.to_container(cfg[section]) == theirs, section
    assert cfg.get("spec_augment") is None  # augmentation stays off unless asked for
    perception = SpeechPerception(cfg)
    assert perception.load_encoder_from_nemo(str(path)) == ([], [])
    perception.eval()
    audio, lens = torch.randn(2, 16000), torch.tensor([16000, 11000])
    with torch.no_grad():
        feats, flens = model.preprocessor(input_signal=audio, length=lens)
        want, want_lens = model.encoder(audio_signal=feats, length=flens)
        got, got_lens = perception._encode(audio, lens)
    torch.testing.assert_close(got_lens, want_lens)
    torch.testing.assert_close(got, want.transpose(1, 2))


def test_keys_beside_init_from_nemo_override(asr):
    _, path = asr
    spec = {"freq_masks": 1, "time_masks": 2, "freq_width": 10, "time_width": 0.05}
    cfg = SpeechPerception.resolve_config({"init_from_nemo": str(path), "adapter": ADAPTER, "spec_augment": spec,
                                           "encoder": {"dropout": 0.0}, "preprocessor": None})
    assert cfg.encoder.dropout == 0.0 and cfg.encoder.xscaling and cfg.spec_augment == spec
    assert SpeechPerception(cfg).load_encoder_from_nemo(str(path)) == ([], [])  # dropout changes no weight
    cfg = SpeechPerception.resolve_config({"init_from_nemo": str(path), "adapter": ADAPTER,
                                           "encoder": {"subsampling_factor": 4}})
    with pytest.raises(NemoCheckpointError, match="encoder.subsampling_factor: checkpoint 8, ours 4"):
        SpeechPerception(cfg).load_encoder_from_nemo(str(path))


@pytest.mark.parametrize("kind", ["llama3", "qwen3"])
def test_init_from_hf_alone_defines_the_llm(kind, tmp_path):
    hf = hf_folder(kind, tmp_path)
    section = llm_section({"init_from_hf": str(tmp_path), "train_mode": "lora", "max_sequence_length": 1024})
    derived = dataclasses.asdict(llm_config_from_hf(hf.config))
    assert {k: section[k] for k in HF_FIXED} == {k: derived[k] for k in HF_FIXED}
    assert section["max_sequence_length"] == 1024 and section["train_mode"] == "lora"
    assert set(section) == {*HF_FIXED, *HF_DEFAULTS, "init_from_hf", "train_mode"}
    assert section["qk_layernorm"] == (kind == "qwen3") and section["rope_scaling"] == (kind == "llama3")
    # equal restated keys pass, differing ones name themselves; a larger vocabulary (added tokens) is fine
    same = {"num_layers": 2, "hidden_size": 64, "vocab_size": derived["vocab_size"] + 3}
    assert llm_section({"init_from_hf": str(tmp_path), **same})["vocab_size"] == derived["vocab_size"] + 3
    with pytest.raises(ValueError, match=r"llm.num_layers=4, its config.json gives 2; llm.num_query_groups=4, its"):
        llm_section({"init_from_hf": str(tmp_path), "num_layers": 4, "num_query_groups": 4})


def test_unsupported_llm_family_is_named(tmp_path):
    import transformers as T

    T.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                    architectures=["MistralForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match=r"model_type 'mistral' \(MistralForCausalLM\) has no weight mapping.*"
                                                  r"supported are llama, qwen2, qwen3"):
        llm_section({"init_from_hf": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        llm_section({"init_from_hf": str(tmp_path / "nothing")})
