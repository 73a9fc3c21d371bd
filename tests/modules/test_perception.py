import dataclasses
import io
import os
import tarfile
import tempfile

import pytest
import torch
import yaml

from nemo_jstip.checkpoint import UnsafeCheckpointError
from nemo_jstip.modules.perception import NemoCheckpointError, SpeechPerception

SR = 16000


def _config(type="mlp", stack=2, stack_pad=True, pad_to=16, d_model=32, n_layers=2, features=64, **top):
    return {
        "preprocessor": dict(sample_rate=SR, window_size=0.025, window_stride=0.01, n_fft=512, features=features,
                             dither=1e-5, pad_to=pad_to, normalize="per_feature"),
        "encoder": dict(feat_in=features, n_layers=n_layers, d_model=d_model, n_heads=4, ff_expansion_factor=2,
                        subsampling="dw_striding", subsampling_factor=8, subsampling_conv_channels=8,
                        conv_kernel_size=9),
        "adapter": dict(type=type, stack=stack, stack_pad=stack_pad, hidden_size=32, num_heads=4, output_size=24),
        **top,
    }


def _lengths():
    """Audio lengths around mel-hop and 80/160/240 ms frame boundaries, plus tiny and empty items (<= 2.5 s)."""
    edges = {m * 1280 + d for m in (1, 2, 3, 4, 5, 6, 7, 12, 25) for d in (-161, -1, 0, 1, 159, 160)}
    return sorted(edges | {0, 1, 100, 511, 512, 513, 2 * SR + 7})


@pytest.mark.parametrize("stack_pad", [True, False], ids=["pad", "drop"])
@pytest.mark.parametrize("stack", [1, 2, 3])
@pytest.mark.parametrize("type", ["mlp", "transformer"])
def test_frame_lens_equal_frame_spec(type, stack, stack_pad):
    torch.manual_seed(0)
    m = SpeechPerception(_config(type, stack, stack_pad)).eval()
    with torch.no_grad():
        for chunk in torch.tensor(_lengths()).split(16):
            frames, lens = m(torch.randn(len(chunk), int(chunk.max())), chunk)
            assert lens.tolist() == m.frame_spec.num_frames_batch(chunk).tolist()
            assert frames.shape == (len(chunk), int(lens.max()), 24)
            assert torch.isfinite(frames).all()
            assert not frames[~(torch.arange(frames.shape[1]) < lens[:, None])].any()  # zero past each length


@pytest.mark.parametrize(
    "type,stack,stack_pad,pad_to",
    [("mlp", 2, True, 0), ("transformer", 3, True, 0), ("transformer", 2, False, 16), ("mlp", 1, True, 16)],
)
def test_padding_invariance(type, stack, stack_pad, pad_to):
    """Eval mode: an utterance alone == the same utterance next to a longer one (either batch position).

    Holds because NeMo's per_feature normalisation uses the valid mel frames only and zeroes the rest, the STFT
    pads with zeros (like batch padding), ConvSubsampling masks between stages, attention and the conv module mask,
    and the adapter zeroes encoder padding and masks attention keys. (Training mode is not invariant: dither,
    dropout and the Conformer's BatchNorm batch statistics.)
    """
    torch.manual_seed(0)
    m = SpeechPerception(_config(type, stack, stack_pad, pad_to=pad_to)).eval()
    short, long = torch.randn(int(1.45 * SR)), torch.randn(3 * SR + 333)
    enc_frames = dataclasses.replace(m.frame_spec, stack=1).num_frames(len(short))
    assert stack == 1 or enc_frames % stack  # the last stack is incomplete: padded (or dropped) frames matter
    batch = torch.zeros(2, len(long))
    batch[0, : len(short)], batch[1] = short, long
    with torch.no_grad():
        alone, alone_len = m(short[None], torch.tensor([len(short)]))
        both, both_len = m(batch, torch.tensor([len(short), len(long)]))
        flipped, flipped_len = m(batch.flip(0), torch.tensor([len(long), len(short)]))
    n = int(alone_len)
    assert both_len[0] == flipped_len[1] == n and alone.shape[1] == n
    torch.testing.assert_close(both[0, :n], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped[1, :n], alone[0], atol=1e-5, rtol=0)
    flat = SpeechPerception.flat_frames(both, both_len)
    torch.testing.assert_close(flat, torch.cat([both[0, :n], both[1, : int(both_len[1])]]))


@pytest.mark.parametrize("type", ["mlp", "transformer"])
def test_gradients_and_freeze_flags(type):
    torch.manual_seed(0)
    audio, lens = torch.randn(3, SR), torch.tensor([0, 5000, SR])  # an empty item must not poison gradients
    m = SpeechPerception(_config(type)).train()
    frames, _ = m(audio, lens)
    frames.square().sum().backward()
    for part in (m.encoder, m.adapter):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert not list(m.preprocessor.parameters())  # buffers only: nothing to freeze

    m = SpeechPerception(_config(type, freeze_encoder=True)).train()
    assert not any(p.requires_grad for p in m.encoder.parameters())
    assert all(p.requires_grad for p in m.adapter.parameters())
    assert m.adapter.training and not m.encoder.training  # frozen part stays in eval (BatchNorm stats, dropout)
    seen = []
    m.encoder.register_forward_hook(lambda mod, args, out: seen.append(out[0].requires_grad))
    frames, _ = m(audio, lens)
    assert seen == [False]  # the frozen encoder keeps no activations for backward
    frames.sum().backward()
    assert all(p.grad is None for p in m.encoder.parameters())
    assert all(p.grad is not None for p in m.adapter.parameters())

    m.set_frozen(encoder=False, adapter=True)
    assert m.encoder.training and not m.adapter.training
    assert all(p.requires_grad for p in m.encoder.parameters())
    assert not any(p.requires_grad for p in m.adapter.parameters())


def test_encoder_cache_is_exact_and_skips_the_encoder():
    torch.manual_seed(0)
    cfg = _config("mlp", freeze_encoder=True, encoder_cache_mb=1)
    ref, m = SpeechPerception(cfg), SpeechPerception(cfg)
    m.load_state_dict(ref.state_dict())
    m.encoder.eval(), ref.encoder.eval()
    calls = []
    m.encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0] if args else 1))
    a, b, c = torch.randn(SR), torch.randn(9000), torch.randn(5000)
    pad = lambda *w: (torch.nn.utils.rnn.pad_sequence(list(w), batch_first=True), torch.tensor([len(x) for x in w]))
    m.train()
    assert not m.preprocessor.training  # cached features are deterministic (no dither)
    first, _ = m(*pad(a, b))
    assert calls and m.cache_stats == {"hits": 0, "misses": 2, "full": 0, "disk": 0}
    calls.clear()
    out, lens = m(*pad(c, b, a))  # two hits in other rows and another padding, one miss
    assert len(calls) == 1 and m.cache_stats["hits"] == 2 and m.cache_stats["misses"] == 3
    with torch.no_grad():
        ref.preprocessor.eval()
        want, want_lens = ref.adapter(*ref._encode(*pad(c, b, a)))
    assert lens.tolist() == want_lens.tolist() == m.frame_spec.num_frames_batch(pad(c, b, a)[1]).tolist()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.sum().backward()  # the adapter still trains on memoised frames
    assert all(p.grad is not None for p in m.adapter.parameters())

    m.load_state_dict(ref.state_dict())  # new weights: stale entries go
    assert not m.cache
    tiny = SpeechPerception(_config("mlp", freeze_encoder=True, encoder_cache_mb=1))
    tiny.cache_limit = 64  # room for nothing: outputs are recomputed, never wrong
    tiny(*pad(a, b)), tiny(*pad(a, b))
    assert not tiny.cache and tiny.cache_stats["full"] == 4 and tiny.cache_stats["hits"] == 0
    for bad in (dict(freeze_encoder=False), dict(freeze_encoder=True, spec_augment=dict(freq_masks=2))):
        with pytest.raises(ValueError, match="encoder_cache_mb"):
            SpeechPerception(_config("mlp", encoder_cache_mb=1, **bad))


def test_encoder_cache_on_disk_serves_later_processes_of_the_same_weights(tmp_path, caplog):
    """Another run (seed, resume) of the same encoder reads the first one's outputs; other weights never do."""
    torch.manual_seed(0)
    cfg = _config("mlp", freeze_encoder=True, encoder_cache_mb=1, encoder_cache_dir=str(tmp_path))
    first = SpeechPerception(cfg)
    pad = lambda *w: (torch.nn.utils.rnn.pad_sequence(list(w), batch_first=True), torch.tensor([len(x) for x in w]))
    a, b = torch.randn(SR), torch.randn(9000)
    enc, lens = first.encode(*pad(a, b))
    (folder,) = tmp_path.iterdir()
    assert len(list(folder.glob("*.pt"))) == 2 and first.cache_stats["disk"] == 0

    def fresh(state):
        m = SpeechPerception(cfg)
        m.load_state_dict(state)
        calls = []
        m.encoder.register_forward_hook(lambda mod, args, out: calls.append(1))
        return m, calls

    later, calls = fresh(first.state_dict())  # a new process: empty memory, same weights
    got, got_lens = later.encode(*pad(b, a))
    assert not calls and later.cache_stats == {"hits": 2, "misses": 0, "full": 0, "disk": 2}
    assert torch.equal(got, enc[[1, 0]][:, : got.shape[1]]) and got_lens.tolist() == lens[[1, 0]].tolist()
    later.encode(*pad(a))  # now from memory
    assert later.cache_stats["disk"] == 2 and later.cache_stats["hits"] == 3

    state = {k: v.clone() for k, v in first.state_dict().items()}
    state["encoder.layers.0.feed_forward1.linear1.weight"] += 0.01
    other, calls = fresh(state)  # other weights: their own folder, nothing read back
    other.encode(*pad(a, b))
    assert calls and other.cache_stats["disk"] == 0 and len(list(tmp_path.iterdir())) == 2

    next(folder.glob("*.pt")).write_bytes(b"truncated")
    broken, calls = fresh(first.state_dict())
    with caplog.at_level("WARNING"):
        broken.encode(*pad(a, b))
    assert calls and broken.cache_stats["disk"] == 1 and "is unreadable" in caplog.text
    again, calls = fresh(first.state_dict())  # the entry was rewritten
    again.encode(*pad(a, b))
    assert not calls and again.cache_stats["disk"] == 2
    (tmp_path / "file").write_text("")  # a folder that cannot be made (a .nemo restored elsewhere): memory only
    elsewhere = SpeechPerception({**cfg, "encoder_cache_dir": str(tmp_path / "file" / "cache")})
    with caplog.at_level("WARNING"):
        elsewhere.encode(*pad(a, b))
    assert "cannot write" in caplog.text and elsewhere.disk_cache_dir() is None and len(elsewhere.cache) == 2
    with pytest.raises(ValueError, match="encoder_cache_dir"):
        SpeechPerception(_config("mlp", freeze_encoder=True, encoder_cache_dir=str(tmp_path)))


def test_spec_augment_is_a_training_only_switch():
    calls = []
    assert SpeechPerception(_config()).spec_augmentation is None  # default off
    m = SpeechPerception(_config(spec_augment=dict(freq_masks=2, time_masks=2, freq_width=8, time_width=0.05)))
    m.spec_augmentation.register_forward_hook(lambda *a: calls.append(1))
    audio, lens = torch.randn(2, SR), torch.tensor([SR, 9000])
    m.eval()(audio, lens)
    assert not calls
    m.train()(audio, lens)
    assert calls


def test_bf16_autocast_cpu_proxy():
    """The GPU path runs under autocast("cuda", bf16); on CPU the same code runs under autocast("cpu", bf16)."""
    torch.manual_seed(0)
    m = SpeechPerception(_config("transformer")).eval()
    audio, lens = torch.randn(2, SR), torch.tensor([SR, 9000])
    with torch.no_grad():
        ref, ref_len = m(audio, lens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, out_len = m(audio, lens)
    assert out.dtype == torch.bfloat16 and out_len.tolist() == ref_len.tolist()
    torch.testing.assert_close(out.float(), ref, atol=0.05 * float(ref.abs().max()), rtol=0)


# ---- .nemo loading ----

@pytest.fixture(scope="module")
def asr_nemo(tmp_path_factory):
    """A tiny EncDecCTCModel (char vocabulary, random weights) saved with .save_to(): a stand-in for a real .nemo."""
    from nemo.collections.asr.models import EncDecCTCModel
    from omegaconf import OmegaConf

    cfg = _config(pad_to=0)
    pre = {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor", **cfg["preprocessor"]}
    enc = {"_target_": "nemo.collections.asr.modules.ConformerEncoder", **cfg["encoder"]}
    vocab = list(" abcdefghijklmnopqrstuvwxyz'")
    dec = dict(_target_="nemo.collections.asr.modules.ConvASRDecoder", feat_in=32, num_classes=len(vocab),
               vocabulary=vocab)
    torch.manual_seed(1)
    asr = EncDecCTCModel(OmegaConf.create(dict(sample_rate=SR, labels=vocab, preprocessor=pre, encoder=enc,
                                               decoder=dec, train_ds=None, validation_ds=None, optim=None)))
    path = tmp_path_factory.mktemp("asr") / "tiny_ctc.nemo"
    asr.save_to(str(path))
    return str(path), asr.eval()


def test_load_encoder_from_nemo(asr_nemo):
    path, asr = asr_nemo
    cfg = SpeechPerception.config_from_nemo(path, adapter=dict(stack=2, hidden_size=32, output_size=24))
    assert cfg.encoder.d_model == 32 and cfg.preprocessor.pad_to == 0 and cfg.spec_augment is None
    torch.manual_seed(2)
    m = SpeechPerception(cfg).eval()
    theirs = asr.encoder.state_dict()
    assert not all(torch.equal(v, theirs[k]) for k, v in m.encoder.state_dict().items())  # random init differs
    assert m.load_encoder_from_nemo(path) == ([], [])
    ours = m.encoder.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    audio, lens = torch.randn(2, 2 * SR), torch.tensor([2 * SR, 21111])
    with torch.no_grad():
        mel, mel_len = asr.preprocessor(input_signal=audio, length=lens)
        ref, ref_len = asr.encoder(audio_signal=mel, length=mel_len)
        mel2, mel_len2 = m.preprocessor(input_signal=audio, length=lens)
        out, out_len = m.encoder(audio_signal=mel2, length=mel_len2)
    assert torch.equal(out, ref) and torch.equal(out_len, ref_len)

    built = SpeechPerception.from_nemo(path, adapter=dict(type="transformer", hidden_size=32, num_heads=4,
                                                          output_size=24), freeze_encoder=True)
    assert built.freeze_encoder and all(torch.equal(v, theirs[k]) for k, v in built.encoder.state_dict().items())


def test_mismatching_config_is_named(asr_nemo):
    path, _ = asr_nemo
    m = SpeechPerception(_config(d_model=48, n_layers=3, features=80, pad_to=16))  # pad_to/dither may differ
    with pytest.raises(NemoCheckpointError) as err:
        m.load_encoder_from_nemo(path)
    msg = str(err.value)
    for key in ("encoder.d_model", "encoder.n_layers", "encoder.feat_in", "preprocessor.features"):
        assert key in msg
    assert "pad_to" not in msg and "dither" not in msg
    SpeechPerception(_config(pad_to=16)).load_encoder_from_nemo(path)  # only free keys differ: loads


def _write_tar(path, files, extra=()):
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)


def _members(nemo_path):
    with tarfile.open(nemo_path) as tar:
        return {os.path.normpath(m.name): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _info(name, type=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = type, linkname, 1 if type == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("evil", [_info("../evil"), _info("/tmp/evil_abs"), _info("./a/../../evil"),
                                  _info("link", tarfile.SYMTYPE, "/etc/passwd"),
                                  _info("hard", tarfile.LNKTYPE, "../evil")],
                         ids=["dotdot", "absolute", "nested-dotdot", "symlink", "hardlink"])
def test_unsafe_archive_is_refused(asr_nemo, tmp_path, evil):
    path, _ = asr_nemo
    bad = tmp_path / "evil.nemo"
    _write_tar(bad, _members(path), extra=[evil])
    m = SpeechPerception(_config(pad_to=0))
    with pytest.raises(NemoCheckpointError, match="unsafe archive member"):
        m.load_encoder_from_nemo(str(bad))
    with pytest.raises(NemoCheckpointError, match="unsafe archive member"):
        SpeechPerception.config_from_nemo(str(bad))
    assert not os.path.exists(os.path.join(tempfile.gettempdir(), "evil")) and not os.path.exists("/tmp/evil_abs")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_untrusted_content_is_not_executed(asr_nemo, tmp_path):
    path, _ = asr_nemo
    files = _members(path)
    # weights: a pickle that would run code is refused by torch.load(weights_only=True)
    buf = io.BytesIO()
    torch.save({"encoder.x": _Payload()}, buf)
    _write_tar(tmp_path / "pickle.nemo", {**files, "model_weights.ckpt": buf.getvalue()})
    with pytest.raises(UnsafeCheckpointError, match="model_weights.ckpt: not weights-only data"):
        SpeechPerception(_config(pad_to=0)).load_encoder_from_nemo(str(tmp_path / "pickle.nemo"))
    # config: a _target_ is never instantiated; one that is not the class we build is an error
    cfg = yaml.safe_load(files["model_config.yaml"])
    cfg["encoder"]["_target_"] = "os.system"
    _write_tar(tmp_path / "target.nemo", {**files, "model_config.yaml": yaml.safe_dump(cfg).encode()})
    with pytest.raises(NemoCheckpointError, match="os.system"):
        SpeechPerception.config_from_nemo(str(tmp_path / "target.nemo"))


def test_strict_flag(asr_nemo, tmp_path):
    path, _ = asr_nemo
    files = _members(path)
    state = torch.load(io.BytesIO(files["model_weights.ckpt"]), weights_only=True)
    buf = io.BytesIO()
    torch.save({**state, "encoder.extra": torch.zeros(1)}, buf)
    _write_tar(tmp_path / "extra.nemo", {**files, "model_weights.ckpt": buf.getvalue()})
    m = SpeechPerception(_config(pad_to=0))
    with pytest.raises(RuntimeError, match="encoder|extra"):
        m.load_encoder_from_nemo(str(tmp_path / "extra.nemo"))
    assert m.load_encoder_from_nemo(str(tmp_path / "extra.nemo"), strict=False) == ([], ["encoder.extra"])
    _write_tar(tmp_path / "noweights.nemo", {"model_config.yaml": files["model_config.yaml"]})
    with pytest.raises(NemoCheckpointError, match="model_weights.ckpt"):
        m.load_encoder_from_nemo(str(tmp_path / "noweights.nemo"))


def test_config_interpolations_resolve():
    """Recipes write ``output_size: ${model.llm.hidden_size}``; the section is a node of the full config."""
    from omegaconf import OmegaConf

    cfg = _config()
    cfg["adapter"]["output_size"] = "${llm.hidden_size}"
    root = OmegaConf.create({"llm": {"hidden_size": 40}, "perception": cfg})
    m = SpeechPerception(root.perception).eval()
    assert m.output_size == 40 and m(torch.randn(1, SR), torch.tensor([SR]))[0].shape[-1] == 40


def split_encode() -> dict:
    """Rank body (2 processes): one perception (training mode, BatchNorm) on a batch of 3 clips, encoded in shares
    (``split_over_tp``; the share count padded with a copy) on a TP=2 group, then a CP=2 group, then whole at TP=1.

    Each rank's loss is what the LLM gives it: at TP without sequence parallelism the same loss on every rank (all
    positions); under SP and over CP its own positions only (here: alternate frames). Returns the frames, each
    rank's parameter gradients and the BatchNorm running statistics of every case."""
    from nemo_jstip.parallel.dist import init_parallel

    g = torch.Generator().manual_seed(1)
    audio = 0.1 * torch.randn(3, 2 * SR, generator=g)
    lens = torch.tensor([2 * SR, SR + 123, SR // 2])
    cfg = _config(n_layers=1)
    cfg["preprocessor"]["dither"] = 0.0  # no RNG in the forward: shares and the whole batch compute one function
    cfg["encoder"].update(dropout=0.0, dropout_pre_encoder=0.0, dropout_emb=0.0, dropout_att=0.0)

    def run(partial: bool) -> dict:
        torch.manual_seed(0)
        model = SpeechPerception(cfg).train()
        frames, frame_lens = model(audio, lens, partial_grads=partial)
        weight = torch.randn(frames.shape, generator=torch.Generator().manual_seed(2))
        if partial:
            rank = torch.distributed.get_rank()
            weight = weight * (torch.arange(frames.shape[1]) % 2 == rank)[:, None]
        (frames * weight).sum().backward()
        return {"frames": frames.detach(), "frame_lens": frame_lens,
                "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
                "buffers": {k: b.clone() for k, b in model.named_buffers() if "running" in k}}

    out = {}
    init_parallel(tp=2)
    out["tp"], out["tp_sp"] = run(False), run(True)
    init_parallel(cp=2)
    out["cp"] = run(True)
    init_parallel(tp=1)
    out["whole"] = run(False)
    return out


def test_split_over_tp_and_cp_equals_one_rank():
    """Frames, BatchNorm statistics and (summed over the group, as the engine and DDP sum them) gradients of a
    perception split over TP=2 (with and without SP) or CP=2 equal one rank's on the whole batch."""
    from nemo_jstip.parallel.dist import spawn

    r0, r1 = spawn(split_encode, 2, timeout_s=120)
    whole = r0["whole"]
    assert len(whole["grads"]) > 10 and any("batch_norm" in k for k in whole["buffers"])
    top = max(g.abs().max().item() for g in whole["grads"].values())
    for case in ("tp", "tp_sp", "cp"):
        for r in (r0, r1):
            torch.testing.assert_close(r[case]["frames"], whole["frames"], atol=1e-5, rtol=1e-5)
            assert torch.equal(r[case]["frame_lens"], whole["frame_lens"])
            for k, b in whole["buffers"].items():
                torch.testing.assert_close(r[case]["buffers"][k], b, atol=1e-6, rtol=1e-5, msg=f"{case} {k}")
                assert torch.equal(r0[case]["buffers"][k], r1[case]["buffers"][k])  # the same on the group's ranks
        diff = max((r0[case]["grads"][k] + r1[case]["grads"][k] - g).abs().max().item()
                   for k, g in whole["grads"].items())
        print(f"{case}: max |sum of the ranks' grads - whole| = {diff:.2e} (largest gradient {top:.2e})")
        assert diff <= 1e-5 * top, case
