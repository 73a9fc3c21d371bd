"""Encoder+adapter length arithmetic and word-time -> frame mapping: the one source of truth.

The data path must know, before any audio is encoded, how many frames the speech side emits for a cut (to
lay out placeholders and to measure an example's cost) and which of those frames each word covers. Both follow
from the configs of NeMo's ``AudioToMelSpectrogramPreprocessor`` + ``ConformerEncoder`` and our frame-stacking
adapter; ``FrameSpec`` mirrors the integer arithmetic of ``FilterbankFeatures.get_seq_len`` and
``subsampling.calc_length`` exactly (tests check it against the real modules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from lhotse.utils import compute_num_samples

Silence = Literal["left", "right", "split"]

# NeMo ConvSubsampling: subsampling type -> (kernel, stride, ceil_mode, all_paddings, all_paddings when causal).
_CONV = {
    "dw_striding": (3, 2, False, 2, 3),
    "striding": (3, 2, False, 2, 3),
    "striding_conv1d": (5, 2, False, 4, 5),
    "dw_striding_conv1d": (5, 2, False, 4, 4),  # NeMo has no causal variant: always symmetric padding
    "vggnet": (2, 2, True, 0, 0),  # max-pool stages
}


class AlignmentError(ValueError):
    """A cut whose transcript/word alignment/audio cannot be turned into frames; the message names the cut."""


@dataclass(frozen=True)
class FrameSpec:
    """Lengths of preprocessor -> ConformerEncoder pre-encode -> adapter (stack ``stack`` frames).

    Defaults are a 16 kHz FastConformer (10 ms hop, n_fft 512, dw_striding x8) with no stacking: 80 ms frames.
    """

    sample_rate: int = 16000
    hop: int = 160  # preprocessor window_stride in samples
    n_fft: int = 512
    exact_pad: bool = False  # FilterbankFeatures(exact_pad=True): explicit pad instead of STFT centering
    subsampling_factor: int = 8  # power of two; 1 = no conv subsampling (NeMo uses a Linear)
    conv_kernel: int = 3
    conv_stride: int = 2
    conv_padding: int = 2  # left + right padding of each stage, as calc_length's all_paddings
    conv_ceil: bool = False
    stack: int = 1  # adapter stacks this many consecutive encoder frames
    stack_pad: bool = True  # zero-pad the last incomplete stack (ceil) or drop it (floor)

    def __post_init__(self):
        f = self.subsampling_factor
        if f < 1 or f & (f - 1) or self.stack < 1 or self.hop < 1:
            raise ValueError(f"bad FrameSpec: {self}")

    @classmethod
    def from_config(cls, cfg) -> FrameSpec:
        """From a NeMo-style config with ``preprocessor``, ``encoder`` and optional ``adapter`` sections.

        Reads the same keys (and defaults) as ``AudioToMelSpectrogramPreprocessor`` and ``ConformerEncoder``;
        the adapter section has ``stack`` (default 1) and ``stack_pad`` (default True).
        """
        pre, enc, ada = (dict(cfg.get(k) or {}) for k in ("preprocessor", "encoder", "adapter"))
        sr = pre.get("sample_rate", 16000)
        # AudioToMelSpectrogramPreprocessor: seconds win over samples, converted with int() like NeMo does.
        ws, wz = pre.get("window_stride", 0.01), pre.get("window_size", 0.02)
        hop = int(ws * sr) if ws else pre["n_window_stride"]
        win = int(wz * sr) if wz else pre["n_window_size"]
        kind, factor = enc.get("subsampling", "striding"), enc.get("subsampling_factor", 4)
        if enc.get("reduction") or str(kind).startswith("stacking"):
            # StackingSubsampling's output length depends on the padded batch length, not only on each item.
            raise NotImplementedError(f"encoder reduction / subsampling={kind!r} is not supported")
        if not kind or factor == 1:  # ConformerEncoder then uses a Linear: no subsampling
            kind, factor = "dw_striding", 1
        if kind not in _CONV:
            raise ValueError(f"unknown encoder.subsampling {kind!r}")
        k, s, ceil, pad, causal_pad = _CONV[kind]
        return cls(
            sample_rate=sr,
            hop=hop,
            n_fft=pre.get("n_fft") or 2 ** math.ceil(math.log2(win)),
            exact_pad=bool(pre.get("exact_pad", False)),
            subsampling_factor=factor,
            conv_kernel=k,
            conv_stride=s,
            conv_padding=causal_pad if enc.get("causal_downsampling", False) else pad,
            conv_ceil=ceil,
            stack=ada.get("stack", 1),
            stack_pad=ada.get("stack_pad", True),
        )

    @property
    def samples_per_frame(self) -> int:
        return self.hop * self.subsampling_factor * self.stack

    @property
    def hop_seconds(self) -> float:
        """Duration h of one output frame (frame t starts at t*h)."""
        return self.samples_per_frame / self.sample_rate

    def num_samples(self, duration: float) -> int:
        """Samples of ``duration`` seconds at the encoder's rate (cuts at another rate get resampled)."""
        return compute_num_samples(duration, self.sample_rate)

    def num_frames_batch(self, num_samples):
        """Output lengths for an int ndarray or LongTensor of audio lengths (same type back); integer ops only."""
        n = num_samples
        pad = (self.n_fft - self.hop) // 2 * 2 if self.exact_pad else self.n_fft // 2 * 2
        x = (n + pad - self.n_fft) // self.hop  # FilterbankFeatures.get_seq_len
        x = x * (n != 0)  # ... whose forward() maps empty audio to 0 frames
        for _ in range(self.subsampling_factor.bit_length() - 1):  # calc_length, one stage per factor of 2
            num = x + self.conv_padding - self.conv_kernel
            x = (-((-num) // self.conv_stride) if self.conv_ceil else num // self.conv_stride) + 1
        return -((-x) // self.stack) if self.stack_pad else x // self.stack

    def num_frames(self, num_samples: int) -> int:
        """Exact number of encoder+adapter output frames for ``num_samples`` samples of audio."""
        return int(self.num_frames_batch(np.asarray(num_samples, dtype=np.int64)))

    def word_frames(self, times, num_samples: int, silence: Silence = "split", tol: float = 0.02) -> np.ndarray:
        """Frame range [f0, f1) of each word, as an (N, 2) int64 array.

        ``times`` is (N, 2) [start, end] in seconds from the start of the audio. A word covers
        [floor(start/h), ceil(end/h)); the silence between two words goes to the ``left`` word, the ``right``
        word or is ``split`` at its midpoint, so ranges tile [first word, last word) without gaps. Every word
        keeps at least one frame and all ranges lie inside the real output length (short words next to each
        other are pushed apart). Times may stick out of the audio by ``tol`` seconds (aligner rounding).
        """
        t = np.asarray(times, dtype=np.float64).reshape(-1, 2)
        n, total, dur = len(t), self.num_frames(num_samples), num_samples / self.sample_rate
        if n == 0:
            raise AlignmentError("no words")
        if total == 0:
            raise AlignmentError(f"audio of {num_samples} samples is shorter than one encoder frame")
        if n > total:
            raise AlignmentError(f"{n} words but only {total} encoder frames")
        if not np.isfinite(t).all() or (t[:, 1] < t[:, 0]).any():
            raise AlignmentError("word with negative duration or non-finite time")
        if (t[1:, 0] < t[:-1, 1] - tol).any():
            i = int(np.argmax(t[1:, 0] < t[:-1, 1] - tol))
            pair = f"{t[i].tolist()}, {t[i + 1].tolist()}"
            raise AlignmentError(f"words {i} and {i + 1} are out of order or overlap: {pair}")
        if t[0, 0] < -tol or t[-1, 1] > dur + tol:
            raise AlignmentError(f"word times [{t[0, 0]:.3f}, {t[-1, 1]:.3f}] s exceed the audio [0, {dur:.3f}] s")
        x = t / self.hop_seconds
        lo, hi = np.floor(x[:, 0] + 1e-6).astype(np.int64), np.ceil(x[:, 1] - 1e-6).astype(np.int64)
        a, b = hi[:-1], lo[1:]  # end of word i, start of word i+1
        if silence == "left":
            inner = b
        elif silence == "right":
            inner = a
        elif silence == "split":
            mid = np.floor((x[:-1, 1] + x[1:, 0]) / 2 + 0.5 + 1e-6).astype(np.int64)  # eps: as for lo, hi
            inner = np.clip(mid, np.minimum(a, b), np.maximum(a, b))
        else:
            raise ValueError(f"silence must be left|right|split, not {silence!r}")
        bounds = np.concatenate([lo[:1], inner, hi[-1:]])
        # Strictly increasing within [0, total]: push forward, then pull back; feasible since n <= total.
        k = np.arange(n + 1)
        bounds = k + np.maximum.accumulate(np.clip(bounds, 0, total) - k)
        bounds = k + np.minimum.accumulate((np.minimum(bounds, total - n + k) - k)[::-1])[::-1]
        return np.stack([bounds[:-1], bounds[1:]], axis=1)
