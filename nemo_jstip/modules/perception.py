"""Speech perception: NeMo preprocessor + ConformerEncoder + a frame-stacking adapter into the LLM's hidden size.

JSTIP step 1 encodes the whole utterance once; the model then splices frames into the LLM input with
``frames[audio_item[m], audio_frame[m]]``, so the contract is ``[B, T', llm_hidden]`` plus per-item lengths
that equal ``FrameSpec.from_config(cfg).num_frames_batch(audio_lens)`` exactly (the data path lays out one
placeholder per frame before any audio is encoded). Frames beyond an item's length are zero and never influence
valid frames: NeMo masks between conv-subsampling stages, in attention and in the conv module; the adapter masks
encoder padding before stacking and uses a key padding mask in attention.

Config (keys 1:1 with the code)::

    preprocessor: {...}            # AudioToMelSpectrogramPreprocessor kwargs (_target_ optional, checked, not used)
    encoder: {...}                 # ConformerEncoder kwargs (idem)
    spec_augment: null             # or SpectrogramAugmentation kwargs; applied in training mode only
    adapter: {type: mlp, stack: 2, stack_pad: true, hidden_size: 1024, output_size: 576, dropout: 0.0,
              num_layers: 2, num_heads: null}   # num_layers / num_heads: transformer only
    freeze_encoder: false
    freeze_adapter: false
    encoder_cache_mb: 0            # > 0: memoise the frozen encoder's outputs (see SpeechPerception.encode)
    encoder_cache_dir: null        # and keep them on disk too, per encoder fingerprint, for later runs and resumes
    split_over_tp: true            # under TP/CP: each rank encodes its share of the clips (SpeechPerception.forward)

Precision: the module runs under ``torch.autocast("cuda", dtype=torch.bfloat16)`` (the preprocessor disables
autocast itself and computes features in fp32). Only the LLM's Transformer Engine layers run FP8; the encoder and
adapter stay BF16: NeMo's conv subsampling / depthwise convs have no FP8 kernels, the modules are a small share of
the compute, and the acoustic front end is the part most sensitive to quantisation.

Pretrained encoders come from NeMo ASR ``.nemo`` files with a (Fast)Conformer encoder (CTC, RNNT, hybrid, AED):
``init_from_nemo: X.nemo`` alone gives the preprocessor and encoder (:meth:`SpeechPerception.resolve_config`; keys
beside it override), :meth:`SpeechPerception.load_encoder_from_nemo` loads the weights. Both read the archive with
the checked reader of ``nemo_jstip/checkpoint.py`` and instantiate nothing from it.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from nemo.collections.asr.modules import (
    AudioToMelSpectrogramPreprocessor,
    ConformerEncoder,
    SpectrogramAugmentation,
)
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nemo_jstip.checkpoint import NemoCheckpointError, extract_nemo, read_weights_only
from nemo_jstip.data.frames import FrameSpec

log = logging.getLogger(__name__)

# The only classes a config section may name; we build them directly, never from the string.
_CLASSES = {
    "preprocessor": (AudioToMelSpectrogramPreprocessor, "audio_preprocessing"),
    "encoder": (ConformerEncoder, "conformer_encoder"),
    "spec_augment": (SpectrogramAugmentation, "audio_preprocessing"),
}
# Keys that may differ from a checkpoint's: training-only noise/regularisation, padding/memory/kernel choices,
# and buffers that are rebuilt (pos_emb_max_len: the non-persistent positional table). Everything else changes
# the function the weights compute, so it must match.
_FREE_KEYS = {
    "preprocessor": {"dither", "pad_to", "nb_augmentation_prob", "nb_max_freq", "rng",
                     "use_torchaudio", "stft_exact_pad", "stft_conv"},  # the last three: deprecated no-ops
    "encoder": {
        "dropout", "dropout_pre_encoder", "dropout_emb", "dropout_att", "stochastic_depth_drop_prob",
        "stochastic_depth_mode", "stochastic_depth_start_layer", "subsampling_conv_chunking_factor",
        "use_pytorch_sdpa", "use_pytorch_sdpa_backends", "sync_max_audio_length", "pos_emb_max_len",
    },
}
_NEMO_CONFIG, _NEMO_WEIGHTS = "model_config.yaml", "model_weights.ckpt"


def _kwargs(section: str, cfg) -> dict[str, Any]:
    """A config section as constructor kwargs; ``_target_`` may only name the class we build anyway."""
    kw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})
    target = kw.pop("_target_", None)
    cls, mod = _CLASSES[section]
    allowed = {f"nemo.collections.asr.modules.{cls.__name__}", f"nemo.collections.asr.modules.{mod}.{cls.__name__}"}
    if target is not None and target not in allowed:
        raise NemoCheckpointError(f"{section}._target_ {target!r} is not supported; expected {cls.__name__}")
    return kw


def _resolved(section: str, kw: dict) -> dict[str, Any]:
    """Constructor kwargs with the class defaults filled in, so ``{}`` and ``{d_model: <default>}`` compare equal."""
    params = inspect.signature(_CLASSES[section][0].__init__).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **kw}


def _valid_mask(lens: torch.Tensor, t: int) -> torch.Tensor:
    return torch.arange(t, device=lens.device) < lens[:, None]


class SplitBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training-mode statistics are those of the whole batch while its clips are encoded in
    shares on several ranks (``split_over_tp``): the per-channel sums over this rank's clips (padding clips
    weighted 0) are all-reduced over ``group`` with autograd, so outputs, gradients and running statistics equal
    one rank's on the whole batch, and the running statistics stay identical on the ranks of the group.
    Outside a split (``group`` None), in eval mode, it is ``BatchNorm1d``; same parameters and state-dict keys."""

    group = None  # set for one forward by SpeechPerception._split_forward
    clip_weights: torch.Tensor | None = None  # [B]: 1 for this rank's real clips, 0 for padding ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, C, T]
        if self.group is None or not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xf, w = x.float(), self.clip_weights.to(x.device, torch.float32)[:, None, None]
        n_local = (w.sum() * x.shape[2]).reshape(1)
        sums = all_reduce(torch.cat([(xf * w).sum((0, 2)), n_local]), group=self.group)
        n, mean = sums[-1], sums[:-1] / sums[-1]
        centred = xf - mean[:, None]
        var = all_reduce((centred.square() * w).sum((0, 2)), group=self.group) / n  # two passes, as torch's
        y = centred * torch.rsqrt(var + self.eps)[:, None]
        if self.affine:
            y = y * self.weight[:, None] + self.bias[:, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)  # unbiased, as torch's
        return y.to(x.dtype)


def _split_batch_norms(module: nn.Module) -> None:
    """Make every ``nn.BatchNorm1d`` below ``module`` a ``SplitBatchNorm1d`` (the same object, parameters and
    buffers: only its forward changes)."""
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = SplitBatchNorm1d


class FrameStackAdapter(nn.Module):
    """Concatenate ``stack`` consecutive encoder frames (hop x stack), then an MLP or a small Transformer.

    mlp: Linear(k*d_enc, hidden) -> GELU -> Dropout -> Linear(hidden, output_size).
    transformer: Linear(k*d_enc, hidden) -> ``num_layers`` pre-norm ``nn.TransformerEncoderLayer`` with a key
    padding mask -> LayerNorm -> Linear(hidden, output_size). No positional encoding: the Conformer's output
    already carries position (relative attention + convolutions).
    """

    def __init__(self, input_size: int, output_size: int, type: str = "mlp", stack: int = 1, stack_pad: bool = True,
                 hidden_size: int = 1024, num_layers: int = 2, num_heads: int | None = None, dropout: float = 0.0):
        super().__init__()
        if stack < 1:
            raise ValueError(f"adapter.stack must be >= 1, got {stack}")
        self.stack, self.stack_pad, self.type = stack, stack_pad, type
        if type == "mlp":
            self.net = nn.Sequential(nn.Linear(stack * input_size, hidden_size), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden_size, output_size))
        elif type == "transformer":
            heads = num_heads or max(1, hidden_size // 64)
            layer = nn.TransformerEncoderLayer(hidden_size, heads, dim_feedforward=4 * hidden_size, dropout=dropout,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.proj_in = nn.Linear(stack * input_size, hidden_size)
            self.layers = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(hidden_size),
                                                enable_nested_tensor=False)
            self.proj_out = nn.Linear(hidden_size, output_size)
        else:
            raise ValueError(f"adapter.type must be 'mlp' or 'transformer', not {type!r}")

    def stack_frames(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, D] -> [B, max(out_lens), k*D]. Frames past each item's length are zeroed first, so the padded
        last stack (stack_pad) holds the same zeros whether the item is alone or next to a longer one."""
        k, (b, t, d) = self.stack, x.shape
        out_lens = torch.div(lens + (k - 1 if self.stack_pad else 0), k, rounding_mode="floor")
        n = int(out_lens.max()) * k if b else 0
        x = x.masked_fill(~_valid_mask(lens, t)[..., None], 0.0)
        x = x[:, :n] if n <= t else nn.functional.pad(x, (0, 0, 0, n - t))
        return x.reshape(b, n // k, k * d), out_lens

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lens = self.stack_frames(x, lens)
        valid = _valid_mask(lens, x.shape[1])
        if self.type == "mlp":
            y = self.net(x)
        else:
            # An empty item has every key masked; some attention kernels (older torch, fused paths) then give NaN,
            # and NaN * 0 poisons weight gradients. Let it attend to its first (zero) frame; its output is masked.
            pad_mask = ~_valid_mask(lens.clamp(min=1), x.shape[1])
            y = self.proj_out(self.layers(self.proj_in(x), src_key_padding_mask=pad_mask))
        return y.masked_fill(~valid[..., None], 0.0), lens


class SpeechPerception(nn.Module):
    """Audio [B, samples] -> LLM-sized frames [B, T', output_size]; see the module docstring for the config."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg = OmegaConf.create(cfg) if not isinstance(cfg, DictConfig) else cfg
        pre, enc = _kwargs("preprocessor", cfg.preprocessor), _kwargs("encoder", cfg.encoder)
        feats = pre.get("features", 64) * pre.get("frame_splicing", 1)
        if enc.get("feat_in") != feats:
            raise ValueError(f"encoder.feat_in={enc.get('feat_in')} must equal the preprocessor's {feats} features")
        self.preprocessor = AudioToMelSpectrogramPreprocessor(**pre)
        # NeMo's default all-reduces the batch's max audio length over the whole world on every forward: with
        # PP > 1 (encoder on the first stage only) or ranks decoding different batch counts that deadlocks.
        enc.setdefault("sync_max_audio_length", False)
        self.encoder = ConformerEncoder(**enc)
        spec_aug = cfg.get("spec_augment")
        self.spec_augmentation = SpectrogramAugmentation(**_kwargs("spec_augment", spec_aug)) if spec_aug else None
        adapter = OmegaConf.to_container(cfg.adapter, resolve=True)
        self.adapter = FrameStackAdapter(input_size=self.encoder.d_model, **adapter)
        self.frame_spec = FrameSpec.from_config(cfg)
        self.cache_limit = int(cfg.get("encoder_cache_mb", 0) or 0) * 2**20
        self.cache: dict[bytes, torch.Tensor] = {}
        self.cache_nbytes = 0
        self.cache_stats = {"hits": 0, "misses": 0, "full": 0, "disk": 0}
        self.cache_root = cfg.get("encoder_cache_dir") or None
        if self.cache_root and not self.cache_limit:
            raise ValueError("perception.encoder_cache_dir keeps memoised encoder outputs on disk: it needs "
                             "encoder_cache_mb > 0 (and a frozen encoder without spec_augment)")
        self._cache_dir: str | None = None  # cache_root/<fingerprint of the weights and configs>, set lazily
        self.split_over_tp = bool(cfg.get("split_over_tp", True))
        if self.split_over_tp:
            _split_batch_norms(self.encoder)
        self.set_frozen(encoder=cfg.get("freeze_encoder", False), adapter=cfg.get("freeze_adapter", False))

    @property
    def output_size(self) -> int:
        return self.cfg.adapter.output_size

    def set_frozen(self, encoder: bool, adapter: bool) -> None:
        """Freeze/unfreeze the encoder (the preprocessor has only buffers) and the adapter, e.g. between stages.

        Frozen parts also stay in eval mode (see :meth:`train`) and the frozen encoder runs without autograd.
        """
        self.freeze_encoder, self.freeze_adapter = bool(encoder), bool(adapter)
        if self.cache_limit and (not self.freeze_encoder or self.spec_augmentation is not None):
            raise ValueError("perception.encoder_cache_mb > 0 memoises the encoder's outputs, which is exact only for "
                             "a frozen encoder without spec_augment: set freeze_encoder: true and spec_augment: null, "
                             "or encoder_cache_mb: 0")
        for module, frozen in ((self.encoder, encoder), (self.adapter, adapter)):
            module.requires_grad_(not frozen)
        self.clear_cache()
        self.train(self.training)

    def clear_cache(self) -> None:
        self.cache.clear()
        self.cache_nbytes = 0
        self._cache_dir = None  # the weights may change: fingerprint them again before the next disk access

    def disk_cache_dir(self) -> str | None:
        """``encoder_cache_dir/FINGERPRINT``: a digest of the preprocessor and encoder configs and weights, so
        outputs of other weights (another encoder build, a fine-tuned encoder) are never read back. None when off,
        or when the folder cannot be written (a .nemo restored on another machine names a path that is not there):
        then one warning, and the memory cache goes on alone."""
        if self._cache_dir is None and self.cache_root:
            h = hashlib.blake2b(digest_size=8)
            for section in ("preprocessor", "encoder"):
                h.update(repr(sorted(_resolved(section, _kwargs(section, self.cfg[section])).items())).encode())
            for name, t in [*self.preprocessor.state_dict().items(), *self.encoder.state_dict().items()]:
                t = t.detach().cpu()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.flatten().view(torch.uint8).numpy().tobytes())
            folder = os.path.join(self.cache_root, h.hexdigest())
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                self._disk_off(folder, e)
                return None
            self._cache_dir = folder
        return self._cache_dir

    def _disk_off(self, path: str, error: OSError) -> None:
        log.warning("encoder cache: cannot write %s (%s): memoising in memory only", path, error)
        self.cache_root = self._cache_dir = None

    def _disk_get(self, folder: str, key: bytes, device) -> torch.Tensor | None:
        path = os.path.join(folder, key.hex() + ".pt")
        if not os.path.exists(path):
            return None
        try:
            return torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # unreadable entry: recompute it (and overwrite it below)
            log.warning("encoder cache: %s is unreadable (%s): recomputing it", path, e)
            return None

    def _disk_put(self, folder: str, key: bytes, t: torch.Tensor) -> None:
        path = os.path.join(folder, key.hex() + ".pt")
        tmp = f"{path}.{os.getpid()}.tmp"  # atomic: processes sharing the folder never read a partial file
        try:
            torch.save(t.cpu(), tmp)
            os.replace(tmp, path)
        except OSError as e:  # e.g. the disk is full: training goes on
            self._disk_off(path, e)

    def train(self, mode: bool = True):
        """Keep frozen parts in eval mode: otherwise the Conformer's BatchNorm running statistics drift and dropout
        perturbs features the trainable parts learn from, although no weight gets a gradient."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        if self.cache_limit:  # deterministic features (no dither), so a memoised output equals a recomputed one
            self.preprocessor.eval()
        if self.freeze_adapter:
            self.adapter.eval()
        return self

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor, *,
                partial_grads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, T] float, audio_lens [B] -> frames [B, T', output_size] (zero past each length), frame_lens [B].

        T' = max(frame_lens) and frame_lens == ``self.frame_spec.num_frames_batch(audio_lens)``.

        Under tensor (and context) parallelism every rank of a TP x CP group holds the same batch. With
        ``split_over_tp`` each encodes only its share of the clips and the frames are all-gathered (with autograd),
        instead of every rank encoding every clip; see :meth:`_split_forward`. ``partial_grads``: whether each TP
        rank's gradient of the frames covers only its own positions (sequence parallelism) rather than all of them.
        """
        from megatron.core import parallel_state as ps

        if (self.split_over_tp and ps.model_parallel_is_initialized()
                and ps.get_tensor_model_parallel_world_size() * ps.get_context_parallel_world_size() > 1):
            return self._split_forward(audio, audio_lens.long(), partial_grads)
        enc, enc_lens = self.encode(audio, audio_lens.long())
        return self.adapter(enc, enc_lens)

    def _split_forward(self, audio: torch.Tensor, audio_lens: torch.Tensor,
                       partial_grads: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The clips cut into TP x CP equal shares (the count padded with copies of the last clip); share
        ``cp_rank * TP + tp_rank`` is encoded here, at the batch's full audio length, so that every share sees the
        batch's padding (BatchNorm statistics include padded positions), under the TP rank's RNG stream (dropout,
        dither, SpecAugment draw differently per share). BatchNorm statistics cover the whole batch
        (``SplitBatchNorm1d``). The frames, padded to the batch's T', are all-gathered over TP, then CP.

        Gradients: Megatron's gather returns each rank the gradient of its own share. Over CP each rank's loss
        covers its own positions, so the CP gather sums them; over TP they are either the same on every rank
        (then the gather takes this rank's rows) or, under SP, partial per rank (then it sums them). The
        perception's parameter gradients then cover this rank's clips only: the engine sums them over TP
        (``partial_grad_over_tp``), data-parallel DDP over DP x CP."""
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        tp, cp = ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
        share = ps.get_context_parallel_rank() * tp + ps.get_tensor_model_parallel_rank()
        n = audio.shape[0]
        k = -(-n // (tp * cp))  # clips per share
        idx = torch.arange(share * k, (share + 1) * k, device=audio.device)
        real = idx < n
        idx = idx.clamp(max=n - 1)
        norms = [m for m in self.encoder.modules() if isinstance(m, SplitBatchNorm1d)]
        for m in norms:
            m.group, m.clip_weights = ps.get_tensor_and_context_parallel_group(), real
        try:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                frames, _ = self.adapter(*self.encode(audio[idx], audio_lens[idx]))
        finally:
            for m in norms:
                m.group = m.clip_weights = None
        frame_lens = self.frame_spec.num_frames_batch(audio_lens)
        frames = nn.functional.pad(frames, (0, 0, 0, int(frame_lens.max()) - frames.shape[1]))
        frames = tensor_parallel.gather_from_sequence_parallel_region(
            frames, tensor_parallel_output_grad=partial_grads, group=ps.get_tensor_model_parallel_group())
        frames = tensor_parallel.gather_from_sequence_parallel_region(
            frames, tensor_parallel_output_grad=True, group=ps.get_context_parallel_group())
        return frames[:n], frame_lens.to(device=frames.device, dtype=torch.long)

    def _encode(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mel, mel_lens = self.preprocessor(input_signal=audio.float(), length=audio_lens)
        if self.spec_augmentation is not None and self.training:
            mel = self.spec_augmentation(input_spec=mel, length=mel_lens)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            enc, enc_lens = self.encoder(audio_signal=mel, length=mel_lens)
        return enc.transpose(1, 2), enc_lens

    def encode(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessor + encoder: [B, T_enc, d_model] (zero past each length), lengths [B].

        With ``encoder_cache_mb`` > 0 (frozen encoder only), outputs are memoised by the exact waveform (a digest of
        its samples, so no cut id or manifest can alias two recordings): a frozen encoder computes the same frames
        for the same audio in every epoch, and on a CPU it is most of a training step. Misses are encoded together;
        valid frames do not depend on the batch they are encoded in (NeMo masks padding). New entries stop, with
        one warning, once the cache holds ``encoder_cache_mb`` MiB. With ``encoder_cache_dir`` every computed
        output is also written to disk (one file per waveform, under the weights' fingerprint) and a memory miss
        reads it from there first: other seeds and resumed runs of the same encoder start with a full cache.
        """
        if not self.cache_limit:
            return self._encode(audio, audio_lens)
        lens = audio_lens.tolist()
        wave = audio.detach().float().cpu().numpy()
        keys = [hashlib.blake2b(wave[i, :n].tobytes(), digest_size=16).digest() for i, n in enumerate(lens)]
        miss = [i for i, k in enumerate(keys) if k not in self.cache]
        got = {}
        if miss and (folder := self.disk_cache_dir()):
            got = {keys[i]: t for i in miss if (t := self._disk_get(folder, keys[i], audio.device)) is not None}
            self.cache_stats["disk"] += len(got)
            miss = [i for i in miss if keys[i] not in got]
        if miss:
            idx = torch.tensor(miss, device=audio.device)
            enc, enc_lens = self._encode(audio[idx, : max(lens[i] for i in miss)], audio_lens[idx])
            for j, i in enumerate(miss):
                got[keys[i]] = enc[j, : int(enc_lens[j])].detach().clone()
                if folder := self.disk_cache_dir():
                    self._disk_put(folder, keys[i], got[keys[i]])
        for k, t in got.items():
            if self.cache_nbytes + t.nbytes > self.cache_limit:
                if not self.cache_stats["full"]:
                    log.warning("encoder cache full (%d MiB, %d entries): further outputs are recomputed",
                                self.cache_limit >> 20, len(self.cache))
                self.cache_stats["full"] += 1
                continue
            self.cache[k] = t
            self.cache_nbytes += t.nbytes
        self.cache_stats["hits"] += len(keys) - len(miss)
        self.cache_stats["misses"] += len(miss)
        seqs = [got.get(k, self.cache.get(k)) for k in keys]
        out = nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        return out, torch.tensor([len(t) for t in seqs], dtype=torch.long, device=out.device)

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_cache()  # new weights: memoised outputs are stale
        super()._load_from_state_dict(*args, **kwargs)

    @staticmethod
    def flat_frames(frames: torch.Tensor, frame_lens: torch.Tensor) -> torch.Tensor:
        """The valid frames of all items, item by item, as [sum(frame_lens), D]: the order ``masked_scatter`` fills
        a sequence that holds one placeholder per frame, items in batch order."""
        return frames[_valid_mask(frame_lens, frames.shape[1])]

    # ---- pretrained ASR encoders (.nemo) ----

    @classmethod
    def config_from_nemo(cls, path: str, **sections) -> DictConfig:
        """A perception config whose ``preprocessor``/``encoder`` are the .nemo's own; ``sections`` (``adapter=...``,
        ``freeze_encoder=...``, ``spec_augment=...``) are merged on top. The ASR model's spec_augment is not
        copied: augmentation stays off unless asked for."""
        asr_cfg, _ = _read_nemo(path, weights=False)
        base = {"preprocessor": _kwargs("preprocessor", asr_cfg.preprocessor),
                "encoder": _kwargs("encoder", asr_cfg.encoder), "spec_augment": None, "adapter": {}}
        return OmegaConf.merge(base, sections)

    @classmethod
    def resolve_config(cls, cfg) -> DictConfig:
        """The perception section as the model builds it. With ``init_from_nemo``, the .nemo's preprocessor and
        encoder are the base and the keys given beside it override theirs (an absent or null section is the .nemo's
        as it is); loading the weights then checks that no override changed what they compute. Without it, ``cfg``."""
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)
        if not cfg.get("init_from_nemo"):
            return cfg
        asr_cfg, _ = _read_nemo(cfg.init_from_nemo, weights=False)
        for section in ("preprocessor", "encoder"):
            cfg[section] = OmegaConf.merge(_kwargs(section, asr_cfg[section]), _kwargs(section, cfg.get(section)))
        return cfg

    @classmethod
    def from_nemo(cls, path: str, strict: bool = True, **sections) -> SpeechPerception:
        """Build from a .nemo's preprocessor/encoder configs (plus ``sections``) and load its encoder weights."""
        model = cls(cls.config_from_nemo(path, **sections))
        model.load_encoder_from_nemo(path, strict=strict)
        return model

    def load_encoder_from_nemo(self, path: str, strict: bool = True) -> tuple[list[str], list[str]]:
        """Load ``encoder.*`` (and ``preprocessor.*`` buffers) from a NeMo ASR .nemo into this module.

        The checkpoint's preprocessor/encoder configs must match ours on every key that changes the computation
        (all but ``_FREE_KEYS``), else :class:`NemoCheckpointError` lists the mismatching keys. ``strict`` is passed
        to ``load_state_dict``; returns (missing, unexpected) state-dict keys, both empty when strict.
        """
        asr_cfg, state = _read_nemo(path, weights=True)
        problems = []
        for section in ("preprocessor", "encoder"):
            theirs = _resolved(section, _kwargs(section, asr_cfg.get(section) or {}))
            ours = _resolved(section, _kwargs(section, self.cfg[section]))
            for key in sorted((theirs.keys() | ours.keys()) - _FREE_KEYS[section]):
                if theirs.get(key, "<unset>") != ours.get(key, "<unset>"):
                    problems.append(f"{section}.{key}: checkpoint {theirs.get(key, '<unset>')!r}, "
                                    f"ours {ours.get(key, '<unset>')!r}")
        if problems:
            raise NemoCheckpointError(
                f"{path} does not fit this perception config (build it with SpeechPerception.config_from_nemo):\n  "
                + "\n  ".join(problems))
        missing, unexpected = [], []
        for name, module in (("encoder", self.encoder), ("preprocessor", self.preprocessor)):
            sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            if name == "encoder" and not sub:
                raise NemoCheckpointError(f"{path} has no encoder.* weights")
            if sub:  # older checkpoints store no preprocessor buffers: keep ours (rebuilt from the same config)
                self.clear_cache()
                result = module.load_state_dict(sub, strict=strict)
                missing += [f"{name}.{k}" for k in result.missing_keys]
                unexpected += [f"{name}.{k}" for k in result.unexpected_keys]
        return missing, unexpected


def _read_nemo(path: str, weights: bool) -> tuple[DictConfig, dict[str, torch.Tensor] | None]:
    """Config (and state dict) of an ASR .nemo, without trusting it: the archive goes through the one checked tar
    reader (``nemo_jstip.checkpoint.extract_nemo``), which writes only the two files needed; the YAML is read by
    OmegaConf's safe loader and the weights with ``weights_only=True``, so nothing in the file can run code."""
    wanted = {_NEMO_CONFIG} | ({_NEMO_WEIGHTS} if weights else set())
    with tempfile.TemporaryDirectory(prefix="jstip_asr_") as tmp:
        if missing := wanted - extract_nemo(path, tmp, only=wanted.__contains__):
            raise NemoCheckpointError(f"{path}: no {sorted(missing)} in the archive (a model-parallel checkpoint?)")
        cfg = OmegaConf.load(os.path.join(tmp, _NEMO_CONFIG))
        if "encoder" not in cfg or "preprocessor" not in cfg:
            raise NemoCheckpointError(f"{path}: not an ASR model config (no preprocessor/encoder section)")
        state = read_weights_only(Path(tmp, _NEMO_WEIGHTS), f"{path}: {_NEMO_WEIGHTS}") if weights else None
    return cfg, state
