import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from nemo_jstip.data.frames import AlignmentError, FrameSpec

SR = 16000


def _lengths():
    """~120 lengths in [0.05 s, 6 s]: around mel-hop and encoder-frame boundaries, plus random ones."""
    rng = np.random.default_rng(0)
    edges = [m * step + d for step in (160, 640, 1280) for m in (5, 6, 7, 8, 25, 81, 300) for d in (-1, 0, 1)]
    return sorted(set(edges) | set(rng.integers(800, 6 * SR, 60).tolist()) | {800, 6 * SR})


def _config(factor, subsampling="dw_striding", exact_pad=False, causal=False, stack=1, stack_pad=True):
    return {
        "preprocessor": dict(sample_rate=SR, window_size=0.025, window_stride=0.01, n_fft=512, features=64,
                             exact_pad=exact_pad, dither=0.0),
        "encoder": dict(feat_in=64, n_layers=2, d_model=64, n_heads=4, ff_expansion_factor=2,
                        subsampling=subsampling, subsampling_factor=factor, subsampling_conv_channels=8,
                        causal_downsampling=causal, conv_kernel_size=9),
        "adapter": dict(stack=stack, stack_pad=stack_pad),
    }


def _stack(enc, enc_len, k, pad):
    """Reference adapter: concatenate k consecutive frames of each item, zero-padding or dropping the tail."""
    out = []
    for x, n in zip(enc.transpose(1, 2), enc_len.tolist()):
        x = x[:n]
        x = torch.nn.functional.pad(x, (0, 0, 0, -n % k)) if pad else x[: n - n % k]
        out.append(x.reshape(-1, k * x.shape[-1]).shape[0])
    return out


@pytest.mark.parametrize(
    "kw",
    [dict(factor=8), dict(factor=4), dict(factor=8, exact_pad=True), dict(factor=8, causal=True),
     dict(factor=4, subsampling="striding")],
    ids=["dw8", "dw4", "dw8-exact-pad", "dw8-causal", "striding4"],
)
def test_num_frames_matches_nemo(kw):
    from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor, ConformerEncoder

    cfg = _config(**kw)
    pre = AudioToMelSpectrogramPreprocessor(**cfg["preprocessor"]).eval()
    enc = ConformerEncoder(**cfg["encoder"]).eval()
    spec = FrameSpec.from_config(OmegaConf.create(cfg))
    assert spec == FrameSpec.from_config(cfg)
    assert (spec.hop, spec.n_fft) == (pre.featurizer.hop_length, pre.featurizer.n_fft)
    lengths = torch.tensor(_lengths())
    torch.manual_seed(0)
    with torch.no_grad():
        for chunk in lengths.split(16):  # sorted: little padding
            audio = torch.randn(len(chunk), int(chunk.max()))
            mel, mel_len = pre(input_signal=audio, length=chunk)
            out, out_len = enc(audio_signal=mel, length=mel_len)
            assert out_len.tolist() == spec.num_frames_batch(chunk).tolist()
            assert out_len.tolist() == [spec.num_frames(int(n)) for n in chunk]
            assert out.shape[-1] >= out_len.max()
            for k in (2, 3):
                for pad in (True, False):
                    s = FrameSpec.from_config({**cfg, "adapter": dict(stack=k, stack_pad=pad)})
                    assert _stack(out, out_len, k, pad) == s.num_frames_batch(chunk.numpy()).tolist()


def test_spec_defaults_and_hop():
    spec = FrameSpec.from_config(_config(8, stack=2))
    assert spec.hop_seconds == pytest.approx(0.16)
    assert FrameSpec().hop_seconds == pytest.approx(0.08)
    assert FrameSpec().num_frames(SR) == 13  # 100 mel frames -> 50 -> 25 -> 13
    assert FrameSpec().num_frames(0) == 0
    with pytest.raises(NotImplementedError):
        FrameSpec.from_config({"encoder": {"subsampling": "stacking", "subsampling_factor": 4}})


def _times(*pairs):
    return np.array(pairs, dtype=float)


@pytest.mark.parametrize(
    "silence,expected",
    # words at [0.10, 0.30] and [0.65, 0.90] s; h = 0.08 s: raw frames [1, 4) and [8, 12); gap frames 4..7
    [("left", [[1, 8], [8, 12]]), ("right", [[1, 4], [4, 12]]), ("split", [[1, 6], [6, 12]])],
)
def test_word_frames_silence(silence, expected):
    frames = FrameSpec().word_frames(_times((0.10, 0.30), (0.65, 0.90)), 2 * SR, silence=silence)
    assert frames.tolist() == expected


def test_word_frames_short_words_get_one_frame_each_and_stay_inside():
    spec = FrameSpec()  # 1 s -> 13 frames
    frames = spec.word_frames(_times((0.0, 0.01), (0.01, 0.02), (0.02, 0.03), (0.95, 1.0)), SR)
    assert frames.tolist() == [[0, 1], [1, 2], [2, 3], [3, 13]] or frames[:, 1].max() <= 13
    assert (frames[:, 1] > frames[:, 0]).all() and (frames[1:, 0] == frames[:-1, 1]).all()
    # words crowded at the very end are pulled back inside the real output length
    frames = spec.word_frames(_times((0.99, 0.995), (0.995, 1.0), (1.0, 1.01)), SR)
    assert frames.tolist() == [[10, 11], [11, 12], [12, 13]]


@pytest.mark.parametrize(
    "times,num_samples,match",
    [
        (_times((0.5, 0.6), (0.2, 0.3)), SR, "out of order"),
        (_times((0.1, 0.5), (0.3, 0.6)), SR, "overlap"),
        (_times((0.1, 0.5), (0.6, 1.5)), SR, "exceed"),
        (_times((0.2, 0.1)), SR, "negative duration"),
        (np.zeros((0, 2)), SR, "no words"),
        (_times((0.0, 0.005)), 100, "shorter than one encoder frame"),
        (_times(*[(i * 0.01, i * 0.01 + 0.01) for i in range(20)]), SR, "20 words but only 13"),
    ],
)
def test_word_frames_errors(times, num_samples, match):
    with pytest.raises(AlignmentError, match=match):
        FrameSpec().word_frames(times, num_samples)
