"""A stranger's .nemo runs no code and touches nothing outside its extraction folder, through every entry point
that reads one: ``JSTIPModel.restore_from``, NeMo's generic ``ModelPT.restore_from``, ``load_nemo_weights``
(``model.init_from_nemo``) and the ASR path (``SpeechPerception.config_from_nemo`` / ``load_encoder_from_nemo``).

Each attack is a real saved model with one change. A refusal must be an ``UnsafeCheckpointError`` naming the file,
the member and the reason, while no payload ran (its marker file stays absent) and nothing under the test's folder
but the .nemo itself was opened, listed, created, renamed or removed (Python's audit events watch every load)."""

import contextlib
import gzip
import io
import json
import os
import pickle
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from nemo.core.classes import ModelPT
from nemo.core.classes.common import UnsafeTargetError

from nemo_jstip import checkpoint
from nemo_jstip.checkpoint import UnsafeCheckpointError, load_nemo_weights
from nemo_jstip.models.jstip_model import JSTIPModel
from nemo_jstip.modules.perception import SpeechPerception
from nemo_jstip.parallel.dist import spawn
from tests.conftest import PERCEPTION

META = "model_weights/.metadata"

# ------------------------------------------------------------------ watching a load
_TOUCHED: list[str] | None = None
# audit event -> position of its dir_fd argument (a path relative to a dir_fd, as in shutil.rmtree, is not
# relative to the cwd); "open" with mode None is os.open, which may take one too
_EVENTS = {"open": None, "os.mkdir": 2, "os.remove": 1, "os.rmdir": 1, "os.chmod": 2, "os.utime": 3,
           "os.truncate": None, "os.listdir": None, "os.scandir": None, "os.rename": 2, "os.link": 2,
           "os.symlink": 2, "shutil.copyfile": None}
_TWO_PATHS = {"os.rename", "os.link", "os.symlink", "shutil.copyfile"}


def _audit(event, args):
    if _TOUCHED is None or event not in _EVENTS:
        return
    fd = _EVENTS[event]
    via_fd = (fd is not None and args[fd] not in (None, -1)) or (event == "open" and args[1] is None)
    for a in args[:2 if event in _TWO_PATHS else 1]:
        if isinstance(a, (str, bytes, os.PathLike)) and (os.path.isabs(a) or not via_fd):
            _TOUCHED.append(os.path.abspath(os.fsdecode(a)))


sys.addaudithook(_audit)


@contextlib.contextmanager
def watching(root: Path, allowed=()):
    """Yields a list that, once the body is done, holds the paths under ``root`` (but ``allowed``) it touched."""
    global _TOUCHED
    touched, _TOUCHED = [], []
    try:
        yield touched
    finally:
        seen, _TOUCHED = _TOUCHED, None
        touched += sorted({p for p in seen if Path(p).is_relative_to(root) and p not in set(map(str, allowed))})


def test_watching_sees_reads_and_writes(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    monkeypatch.chdir(tmp_path)
    with watching(tmp_path, allowed=[tmp_path / "ok"]) as touched:
        Path("f").read_text()
        os.makedirs(tmp_path / "d" / "e")
        Path("ok").write_text("")
    assert touched == [str(tmp_path / "d"), str(tmp_path / "d" / "e"), str(tmp_path / "f")]


# ------------------------------------------------------------------ payloads
class Payload:
    """Unpickling it runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def torch_payload(marker, size: int) -> bytes:
    """A ``torch.load`` payload (legacy format: it runs before the reader needs the rest) padded to ``size``."""
    buf = io.BytesIO()
    torch.save([Payload(marker)], buf, _use_new_zipfile_serialization=False)
    assert buf.tell() <= size
    return buf.getvalue().ljust(size, b"\0")


def dotted_payload(marker, metadata: bytes) -> bytes:
    """``STACK_GLOBAL`` (module ``torch.distributed.checkpoint.metadata``, name ``os.system``) called and popped,
    then the real metadata: an unpickler that allow-lists modules runs it and then loads normally."""
    def s(text):  # SHORT_BINUNICODE
        return b"\x8c" + bytes([len(text)]) + text.encode()

    return (b"\x80\x04" + s("torch.distributed.checkpoint.metadata") + s("os.system") + b"\x93"
            + s(f"touch {marker}") + b"\x85R0" + metadata)


def test_payloads_are_live(good_nemo, tmp_path):
    """Each payload runs under the plain unpicklers torch and Megatron use: the refusals below are not vacuous."""
    meta = _members(good_nemo)[META]
    for i, load in enumerate([lambda m: pickle.loads(pickle.dumps(Payload(m))),
                              lambda m: pickle.loads(dotted_payload(m, meta)),
                              lambda m: torch.load(io.BytesIO(torch_payload(m, 1261)), weights_only=False)]):
        with contextlib.suppress(Exception):  # the padding after a torch payload is no pickle
            load(tmp_path / f"ran{i}")
        assert (tmp_path / f"ran{i}").exists(), i


# ------------------------------------------------------------------ building attacks
def _members(nemo) -> dict[str, bytes | None]:
    with tarfile.open(nemo) as t:
        return {os.path.normpath(m.name): t.extractfile(m).read() if m.isfile() else None for m in t.getmembers()}


def _rewrite(src, dst, replace: dict[str, bytes] | None = None, extra=()):
    """Copy the tar ``src`` to ``dst``, with the members named in ``replace`` (normalised names) given new bytes
    and ``extra`` (TarInfo, bytes) members appended."""
    replace = replace or {}
    with tarfile.open(src) as s, tarfile.open(dst, "w:") as d:
        for m in s.getmembers():
            data = s.extractfile(m).read() if m.isfile() else None
            if os.path.normpath(m.name) in replace:
                data = replace[os.path.normpath(m.name)]
                m.size = len(data)
            d.addfile(m, io.BytesIO(data) if data is not None else None)
        for m, data in extra:
            d.addfile(m, io.BytesIO(data) if data is not None else None)
    return dst


def _member(name, data: bytes | None = b"x", kind=tarfile.REGTYPE, linkname="", size=None):
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, linkname
    m.size = size if size is not None else len(data or b"")
    return m, data


def _config(nemo) -> dict:
    return yaml.safe_load(_members(nemo)["model_config.yaml"])


def _with_config(good, bad, **changes):
    """The .nemo with top-level config keys changed (dotted keys reach into sections; None deletes)."""
    cfg = _config(good)
    for key, value in changes.items():
        *parents, last = key.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    return _rewrite(good, bad, {"model_config.yaml": yaml.safe_dump(cfg).encode()})


def _metadata(nemo):
    return pickle.loads(_members(nemo)[META])  # our own saved file


def pickle_slots(nemo) -> list[tuple[str, int, int, str]]:
    """Every pickle of a saved .nemo that Megatron or torch unpickles with plain ``pickle``, as (member, offset,
    length, what): DCP's ``.metadata`` and each non-tensor item in the shard files."""
    md = _metadata(nemo)
    slots = [(META, 0, len(_members(nemo)[META]), "metadata")]
    for index, info in md.storage_data.items():
        if isinstance(md.state_dict_metadata[index.fqn], BytesStorageMetadata):
            slots.append((f"model_weights/{info.relative_path}", info.offset, info.length, index.fqn))
    return slots


def _patched(nemo, member, offset, length, payload: bytes) -> dict[str, bytes]:
    data = _members(nemo)[member]
    return {member: data[:offset] + payload + data[offset + length:]}


# ------------------------------------------------------------------ entry points
def _restore(name):
    JSTIPModel.restore_from(name)


def _generic(name):
    """NeMo's own loader: it extracts the file itself, then JSTIPModel (the config's target) reads it again."""
    ModelPT.restore_from(name)


RESTORES = {"restore_from": _restore, "generic": _generic}
# Refused by NeMo's generic loader itself, before any plugin code runs: its tar extraction (tarfile's "data" filter
# refuses devices; headers whose data is not in the file) and its target allow-list (NeMo's UnsafeTargetError)
NEMO_REFUSES = {"device": tarfile.TarError, "claims_more": tarfile.TarError, "huge_member": tarfile.TarError,
                "target": UnsafeTargetError, "cls_params": UnsafeTargetError,
                "duplicate": UnsafeTargetError}  # NeMo extracts the last of two model_config.yaml: target os.system


class _Untouchable:
    """A model that fails any use: a refusal must come before the loader touches the model."""

    def __getattr__(self, name):
        raise AssertionError(f"the loader used model.{name} before refusing the file")


def _init_from(name):
    load_nemo_weights(_Untouchable(), name)


@pytest.fixture
def refused(tmp_path, monkeypatch):
    """``refused(nemo, *expected, load=...)``: load ``nemo`` from its own folder (cwd) and check the refusal."""
    def run(nemo: Path, *expected, load=_restore, nemo_refuses=None):
        """``nemo_refuses``: the error NeMo's generic loader refuses with before the plugin sees the file."""
        monkeypatch.chdir(nemo.parent)
        error = nemo_refuses if load is _generic and nemo_refuses else UnsafeCheckpointError
        with watching(tmp_path, allowed=[nemo]) as touched, pytest.raises(error) as err:
            load(nemo.name)
        msg = str(err.value)
        if error is UnsafeCheckpointError:  # the plugin's refusal leaves NeMo's restore state as it found it
            assert not ModelPT._is_model_being_restored()
        ModelPT._set_model_restore_state(is_being_restored=False)  # NeMo's own refusals leave it set (NeMo's bug)
        assert not list(tmp_path.rglob("PWNED*")), "the payload ran"
        assert not touched, f"touched outside the extraction folder: {touched}"
        if error is UnsafeCheckpointError:
            assert nemo.name in msg and all(e in msg for e in expected), msg
        return msg
    return run


@pytest.fixture
def bad(tmp_path):
    (tmp_path / "cwd").mkdir()
    return tmp_path / "cwd" / "model.nemo"


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PWNED"


# ------------------------------------------------------------------ every pickle, both JSTIP entry points
@pytest.mark.parametrize("load", [_restore, _generic, _init_from], ids=["restore_from", "generic", "init_from_nemo"])
def test_a_payload_in_any_pickle_is_refused(good_nemo, bad, marker, refused, load):
    slots = pickle_slots(good_nemo)
    assert len(slots) > 2 and any(s[3] == "common_state/shard_0_1" for s in slots)
    for member, offset, length, what in slots:
        payload = pickle.dumps(Payload(marker)) if what == "metadata" else torch_payload(marker, length)
        _rewrite(good_nemo, bad, _patched(good_nemo, member, offset, length, payload))
        reason = "not checkpoint metadata" if what == "metadata" else f"(item {what!r}): not weights-only data"
        refused(bad, member, reason, load=load)


# ------------------------------------------------------------------ the weights folder
WEIGHT_ATTACKS = {  # name: (good, marker -> (members replaced, members added)), what the refusal names
    # a dotted name through an allow-listed module (pickle protocol 4 resolves it to os.system)
    "dotted_name": (lambda good, marker: ({META: dotted_payload(marker, _members(good)[META])}, []),
                    (META, "torch.distributed.checkpoint.metadata:os.system")),
    # pickle(None): DCP would fall back to the rank-local __0.metadata
    "metadata_none": (lambda good, marker: ({META: pickle.dumps(None)}, []), (META, "a NoneType, not a DCP Metadata")),
    "rank_local_metadata": (lambda good, marker: ({META: pickle.dumps(None)}, [
        _member("./model_weights/__0.metadata", pickle.dumps(Payload(marker)))]),
        ("model_weights/__0.metadata", "not a file a save writes")),
    "common_pt": (lambda good, marker: ({}, [_member("./model_weights/common.pt", torch_payload(marker, 400))]),
                  ("model_weights/common.pt", "not a file a save writes")),
    "subfolder": (lambda good, marker: ({}, [_member("./model_weights/sub", None, tarfile.DIRTYPE)]),
                  ("model_weights/sub", "not a file a save writes")),
    "backend": (lambda good, marker: ({"model_weights/metadata.json": b'{"sharded_backend": "zarr"}'}, []),
                ("model_weights/metadata.json", "'zarr', not 'torch_dist'")),
}


def _metadata_edit(good, change) -> dict[str, bytes]:
    md = _metadata(good)
    change(md)
    return {META: pickle.dumps(md)}


def _first_info(md):
    return next(iter(md.storage_data.values()))


METADATA_EDITS = {  # a well-formed Metadata pointing somewhere it must not
    "outside_file": (lambda md: setattr(_first_info(md), "relative_path", "../../outside/x.distcp"),
                     "stored in '../../outside/x.distcp', not a shard file"),
    "past_the_end": (lambda md: setattr(_first_info(md), "length", 10**9), "outside __0_0.distcp"),
    "transforms": (lambda md: setattr(_first_info(md), "transform_descriptors", ["zstd"]), "stream transforms"),
}


@pytest.mark.parametrize("load", [_restore, _generic, _init_from], ids=["restore_from", "generic", "init_from_nemo"])
@pytest.mark.parametrize("attack", [*WEIGHT_ATTACKS, *METADATA_EDITS])
def test_weights_attack_is_refused(good_nemo, bad, marker, refused, attack, load):
    if attack in WEIGHT_ATTACKS:
        build, expected = WEIGHT_ATTACKS[attack]
        _rewrite(good_nemo, bad, *build(good_nemo, marker))
    else:
        change, reason = METADATA_EDITS[attack]
        _rewrite(good_nemo, bad, _metadata_edit(good_nemo, change))
        expected = (META, reason)
    refused(bad, *expected, load=load)


@pytest.mark.parametrize("load", RESTORES.values(), ids=RESTORES)
def test_model_weights_ckpt_is_empty(good_nemo, bad, marker, refused, load):
    """NeMo's generic loader torch.load-s ``model_weights.ckpt`` (weights-only unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)
    and loads it: the plugin refuses any but an empty state dict before that."""
    _rewrite(good_nemo, bad, {"model_weights.ckpt": torch_payload(marker, 2000)})
    refused(bad, "model_weights.ckpt", "not weights-only data", load=load)
    buf = io.BytesIO()
    torch.save({"stage.gpt.embedding.word_embeddings.weight": torch.zeros(2, 2)}, buf)
    _rewrite(good_nemo, bad, {"model_weights.ckpt": buf.getvalue()})
    refused(bad, "model_weights.ckpt", "not an empty state dict", load=load)


def test_state_set_on_a_class_is_refused(good_nemo, bad, refused):
    """BUILD on an allow-listed class would change how Megatron's later reads behave: only instances get state."""
    mod = "torch.distributed.checkpoint.filesystem"
    evil = (b"\x80\x04\x8c" + bytes([len(mod)]) + mod.encode() + b"\x8c\x0c_StorageInfo\x93"
            + b"N}\x8c\x15transform_descriptors]\x8c\x04zstdas\x86b0")  # BUILD (None, {..: ['zstd']}) on the class
    _rewrite(good_nemo, bad, {META: evil + _members(good_nemo)[META]})
    refused(bad, META, "not an instance")
    assert _StorageInfo.transform_descriptors is None


# ------------------------------------------------------------------ the config and the artifacts
def _plant_tokenizer_config(good, outside: Path) -> Path:
    """A real tokenizer_config.json outside the .nemo, which a load that followed the path would read."""
    outside.mkdir(exist_ok=True)
    name = next(n for n in _members(good) if n.endswith("_tokenizer_config.json"))
    (outside / "tokenizer_config.json").write_bytes(_members(good)[name])
    return outside / "tokenizer_config.json"


CONFIG_ATTACKS = {
    "target": ({"target": "os.system"}, "target 'os.system' is not a nemo_jstip model"),
    # allow-listed by NeMo (megatron.core.*) and torch.load-s its path with weights_only=False: restored from the
    # victim's folder holding the file as model.nemo, torch's legacy tar reader would unpickle a member of it
    "top_level_target": ({"_target_": "megatron.core.models.audio.nemo_audio_checkpoint._torch_load",
                          "path": "model.nemo"}, "key '_target_' names a class"),
    "nested_target": ({"optim": {"name": "adamw", "sched": {"_target_": "os.system"}}},
                      "key 'optim.sched._target_' names a class"),
    "cls_params": ({"cls": "os.system", "params": {"command": "true"}}, "key 'cls' names a class"),
    "perception_params": ({"perception__params": {}}, "key 'perception.params' names a class"),
    "interpolation": ({"seed": "${oc.env:HOME}"}, "key 'seed' is an interpolation"),
    "artifact_missing": ({"tokenizer__tokenizer_json": None}, "artifact tokenizer.tokenizer_json=None"),
}


# A top-level ``_target_`` is instantiated by NeMo's generic loader itself (``Serialization.from_config_dict``,
# allow-listed megatron.core callables included) before any model class is looked at: no plugin can refuse it
# there, so that attack is checked on JSTIPModel.restore_from only.
@pytest.mark.parametrize("attack,load", [(a, load) for a in [*CONFIG_ATTACKS, "artifact_dotdot", "artifact_absolute"]
                                         for load in RESTORES.values() if (a, load) != ("top_level_target", _generic)])
def test_config_attack_is_refused(good_nemo, bad, refused, tmp_path, attack, load):
    if attack in CONFIG_ATTACKS:
        changes, reason = CONFIG_ATTACKS[attack]
        _with_config(good_nemo, bad, **changes)
    else:
        planted = _plant_tokenizer_config(good_nemo, tmp_path / "outside")
        value = "nemo:../../outside/tokenizer_config.json" if attack == "artifact_dotdot" else str(planted)
        _with_config(good_nemo, bad, tokenizer__tokenizer_config=value)
        reason = f"artifact tokenizer.tokenizer_config={value!r} is not a file of this .nemo"
    refused(bad, "model_config.yaml", reason, load=load, nemo_refuses=NEMO_REFUSES.get(attack))


@pytest.mark.parametrize("load", RESTORES.values(), ids=RESTORES)
def test_tokenizer_naming_outside_files_is_refused(good_nemo, bad, refused, tmp_path, load):
    """transformers would open the tokenizer file a tokenizer_config.json names, wherever it is."""
    name = next(n for n in _members(good_nemo) if n.endswith("_tokenizer_config.json"))
    tok = json.loads(_members(good_nemo)[name])
    tok["tokenizer_file"] = str(_plant_tokenizer_config(good_nemo, tmp_path / "outside"))
    _rewrite(good_nemo, bad, {name: json.dumps(tok).encode()})
    refused(bad, name, "keys ['tokenizer_file'] name files or code outside the .nemo", load=load)


def test_restored_config_is_cleared(good_nemo, bad, tmp_path, monkeypatch):
    """return_config gives the config restore builds from: every key naming a local path cleared."""
    outside = str(tmp_path / "outside")
    paths = {"init_from_nemo": f"{outside}/a.nemo", "llm__init_from_hf": f"{outside}/hf",
             "perception__init_from_nemo": f"{outside}/asr.nemo", "perception__encoder_cache_dir": f"{outside}/c",
             "tokenizer__path": outside, "train_ds": {"input_cfg": [{"type": "jstip_text", "paths": outside}]},
             "memory_profile": {"enabled": True, "output_path": outside}}
    _with_config(good_nemo, bad, **paths)
    monkeypatch.chdir(bad.parent)
    with watching(tmp_path, allowed=[bad]) as touched:
        conf = JSTIPModel.restore_from(bad.name, return_config=True)
    assert not touched
    for key in paths:
        node = conf
        for k in key.split("__"):
            node = node[k]
        assert node is None, key
    assert conf.tokenizer.tokenizer_json.startswith("nemo:")
    assert conf.llm.hidden_size == _config(good_nemo)["llm"]["hidden_size"]


# ------------------------------------------------------------------ the archive, every entry point
@pytest.fixture(scope="module")
def asr_nemo(tmp_path_factory) -> Path:
    """An ASR .nemo as NeMo writes one: model_config.yaml (preprocessor, encoder, ...) and model_weights.ckpt."""
    torch.manual_seed(0)
    m = SpeechPerception(PERCEPTION)
    state = {k: v for k, v in m.state_dict().items() if k.startswith(("encoder.", "preprocessor."))}
    buf = io.BytesIO()
    torch.save(state, buf)
    cfg = {"sample_rate": 16000, "preprocessor": PERCEPTION["preprocessor"], "encoder": PERCEPTION["encoder"],
           "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": 32, "num_classes": 28}}
    path = tmp_path_factory.mktemp("asr") / "asr.nemo"
    with tarfile.open(path, "w:") as t:
        for name, data in (("./model_config.yaml", yaml.safe_dump(cfg).encode()),
                           ("./model_weights.ckpt", buf.getvalue()), ("./1234_vocab.txt", b"a\nb\n")):
            t.addfile(_member(name, data)[0], io.BytesIO(data))
    return path


def _asr_config(name):
    SpeechPerception.config_from_nemo(name)


def _asr_weights(name):
    SpeechPerception(PERCEPTION).load_encoder_from_nemo(name)


def test_asr_nemo_loads(asr_nemo):
    """The crafted ASR .nemo is a valid one: the refusals below come from the one change each makes."""
    assert SpeechPerception(SpeechPerception.config_from_nemo(str(asr_nemo), adapter=PERCEPTION["adapter"])) \
        .load_encoder_from_nemo(str(asr_nemo)) == ([], [])


TAR_ATTACKS = {
    "gzip": "a gzip-compressed archive: only plain tar is read",
    "dotdot": "unsafe archive member '../../escaped.txt' (a path outside the extraction folder)",
    "absolute": "unsafe archive member '/tmp/escaped.txt' (a path outside the extraction folder)",
    "symlink": "unsafe archive member './link' (a link)",
    "hardlink": "unsafe archive member './hard' (a link)",
    "device": "unsafe archive member './dev' (not a plain file or folder)",
    "duplicate": "unsafe archive member './model_config.yaml' (a duplicate)",
    "too_many": f"more than MAX_MEMBERS={checkpoint.MAX_MEMBERS} members",
    "huge_member": f"unsafe archive member './huge' ({checkpoint.MAX_MEMBER_BYTES + 1} bytes, over MAX_MEMBER_BYTES=",
    "claims_more": "a damaged tar archive (unexpected end of data)",
    "total": "its members exceed MAX_TOTAL_BYTES=1000",
}


def _tar_attack(src: Path, dst: Path, attack: str, tmp_path: Path) -> None:
    if attack == "gzip":
        dst.write_bytes(gzip.compress(src.read_bytes()))
        return
    extra = {"dotdot": [_member("../../escaped.txt")], "absolute": [_member("/tmp/escaped.txt")],
             "symlink": [_member("./link", None, tarfile.SYMTYPE, linkname=str(tmp_path / "outside"))],
             "hardlink": [_member("./hard", None, tarfile.LNKTYPE, linkname="./model_config.yaml")],
             "device": [_member("./dev", None, tarfile.CHRTYPE)],
             "duplicate": [_member("./model_config.yaml", b"target: os.system\n")],
             "too_many": [_member(f"./f{i}", b"") for i in range(checkpoint.MAX_MEMBERS)],
             # headers only, their data not in the file: sizes are checked on the headers
             "huge_member": [_member("./huge", None, size=checkpoint.MAX_MEMBER_BYTES + 1)],
             "claims_more": [_member("./big", None, size=10**8)]}.get(attack, [])
    _rewrite(src, dst, extra=extra)


@pytest.mark.parametrize("load", [_restore, _generic, _init_from, _asr_config, _asr_weights],
                         ids=["restore_from", "generic", "init_from_nemo", "asr_config", "asr_weights"])
@pytest.mark.parametrize("attack", TAR_ATTACKS)
def test_archive_attack_is_refused(good_nemo, asr_nemo, bad, refused, tmp_path, monkeypatch, attack, load):
    src = asr_nemo if load in (_asr_config, _asr_weights) else good_nemo
    _tar_attack(src, bad, attack, tmp_path)
    if attack == "total":
        monkeypatch.setattr(checkpoint, "MAX_TOTAL_BYTES", 1000)
    refused(bad, TAR_ATTACKS[attack], load=load, nemo_refuses=NEMO_REFUSES.get(attack))
    assert not list(tmp_path.rglob("escaped.txt")) and not Path("/tmp/escaped.txt").exists()


def test_asr_weights_payload_is_refused(asr_nemo, bad, marker, refused):
    buf = io.BytesIO()
    torch.save({"encoder.x": Payload(marker)}, buf)
    _rewrite(asr_nemo, bad, {"model_weights.ckpt": buf.getvalue()})
    refused(bad, "model_weights.ckpt: not weights-only data", "posix.system", load=_asr_weights)


# ------------------------------------------------------------------ loads that succeed, in a process of their own
def restore_and_run(setup_path, cached, tensor_bad, init_bads, root) -> dict:
    """Rank body: the cache-dir .nemo restored and run on real batches; a payload in a tensor item; JSTIPModel
    configs whose ``init_from_nemo`` names an attack. What each did, and what it touched under ``root``."""
    from omegaconf import OmegaConf

    from nemo_jstip.parallel.dist import init_parallel

    init_parallel(seed=99)
    setup = torch.load(setup_path, weights_only=False)
    out = {}
    with watching(Path(root), allowed=[cached]) as out["cache_touched"]:
        model = JSTIPModel.restore_from(cached)
        out["loss"] = model.loss(setup["batches"])["loss"]
    out["cache_dir"] = model.cfg.perception.encoder_cache_dir
    out["cache_stats"] = dict(model.stage.perception.cache_stats)
    with watching(Path(root), allowed=[tensor_bad]) as out["tensor_touched"]:
        try:
            JSTIPModel.restore_from(tensor_bad)
        except Exception as e:  # noqa: BLE001 - reported
            out["tensor_error"] = f"{type(e).__name__}: {e}"
    out["init_errors"] = []
    for path in init_bads:
        cfg = OmegaConf.create(setup["cfg"])
        cfg.init_from_nemo = path
        with watching(Path(root), allowed=[path]) as touched:
            try:
                JSTIPModel(cfg)
                out["init_errors"].append((None, touched))
            except Exception as e:  # noqa: BLE001 - reported
                out["init_errors"].append((f"{type(e).__name__}: {e}", touched))
    return out


def test_built_models_touch_nothing_outside(parallel_setup, good_nemo, tmp_path, marker):
    """A restored config's encoder cache dir is cleared (the outside one is never created, though the memory cache
    is in use); a payload in a tensor item is refused by torch's weights-only reader; ``model.init_from_nemo``
    naming an attack is refused before the model loads anything."""
    outside = tmp_path / "outside"
    cached = _with_config(good_nemo, tmp_path / "cached.nemo", perception__encoder_cache_dir=str(outside / "cache"),
                          perception__encoder_cache_mb=1, perception__freeze_encoder=True)
    md = _metadata(good_nemo)
    info = next(s for i, s in md.storage_data.items()
                       if isinstance(md.state_dict_metadata[i.fqn], TensorStorageMetadata))
    tensor_bad = _rewrite(good_nemo, tmp_path / "tensor.nemo", _patched(
        good_nemo, f"model_weights/{info.relative_path}", info.offset, info.length, torch_payload(marker, info.length)))
    slot = next(s for s in pickle_slots(good_nemo) if s[3] == "common_state/shard_0_1")
    init_bads = [_rewrite(good_nemo, tmp_path / "slot.nemo",
                          _patched(good_nemo, *slot[:3], torch_payload(marker, slot[2]))),
                 _rewrite(good_nemo, tmp_path / "dotted.nemo", *WEIGHT_ATTACKS["dotted_name"][0](good_nemo, marker))]
    (out,) = spawn(restore_and_run, 1, parallel_setup, str(cached), str(tensor_bad),
                   [str(p) for p in init_bads], str(tmp_path), timeout_s=300)
    assert out["cache_dir"] is None and out["cache_stats"]["misses"] > 0 and not outside.exists()
    assert out["loss"] > 0 and not out["cache_touched"]
    assert out["tensor_error"].startswith("UnsafeCheckpointError") and not out["tensor_touched"]
    assert "model_weights/: a tensor item is not weights-only data (Trying to load unsupported GLOBAL posix.system" \
        in out["tensor_error"]
    for (error, touched), path in zip(out["init_errors"], init_bads):
        assert error and "UnsafeCheckpointError" in error and path.name in error and not touched, error
    assert "not weights-only data" in out["init_errors"][0][0] and "os.system" in out["init_errors"][1][0]
    assert not list(tmp_path.rglob("PWNED*"))
