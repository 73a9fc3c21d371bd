"""The .nemo format of JSTIPModel, and the one reader of .nemo files (JSTIP models and NeMo ASR models).

Layout of the tar (NeMo's for Megatron models): ``model_config.yaml``, the tokenizer artifacts, ``model_weights/``
(``dist_checkpointing`` ``torch_dist`` format: keys are layout-independent, e.g. global layer numbers, so a checkpoint
saved at TP=2 x PP=2 loads at TP=1 and back), and ``model_weights.ckpt``, an empty state dict. Every rank writes its
own shards, rank 0 packs them, and the .nemo appears by an atomic rename: a killed save leaves no file that looks valid.

Two loaders reach this connector: ``JSTIPModel.restore_from`` directly, and NeMo's generic ``ModelPT.restore_from``
through the class named by ``target``. NeMo's ``SaveRestoreConnector`` (3.0) knows only ``model_weights.ckpt``: it
extracts the file, builds ``target`` from the raw config and then loads that state dict. ``JSTIPModel.__init__``,
the first plugin code it runs, sees that a restore is under way that is not this connector's, and reads the file
again from its path through :func:`vetted_nemo`, builds from the vetted config and loads ``model_weights/``; the
empty ``model_weights.ckpt`` NeMo then loads changes nothing. Every refusal below is a ``NemoCheckpointError``, which
is also NeMo's ``UnsafeTargetError``: the one error ``Serialization.from_config_dict`` passes on from a model's
constructor instead of retrying with the calling class.

Loading a stranger's .nemo (docs/training.md lists the guarantees):

- :func:`extract_nemo` reads plain tar only and checks every member header (count, sizes, names, types) before it
  writes anything, into a fresh folder.
- :func:`_restored_config` refuses class-naming keys and interpolations, clears every key that names a local path,
  and resolves the artifacts inside that folder.
- :func:`_vet_weights` refuses files a save does not write, unpickles DCP's ``.metadata`` with an exact allow-list
  and every non-tensor item with ``weights_only=True``, then rewrites both: Megatron and torch unpickle them with
  plain ``pickle`` (``FileSystemReader.read_metadata``, ``DefaultLoadPlanner.load_bytes``), so they only ever read
  pickles written here from vetted objects. Tensor items are read by torch with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import posixpath
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from nemo.core.classes.common import UnsafeTargetError
from nemo.core.connectors.save_restore_connector import SaveRestoreConnector
from nemo.utils.app_state import AppState
from nemo.utils.model_utils import import_class_by_path
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint import planner as dcp_plan
from torch.distributed.checkpoint.api import CheckpointException

from nemo_jstip.parallel.checkpoint import save_shards

WEIGHTS = "model_weights"
EMPTY_CKPT = "model_weights.ckpt"  # what NeMo's generic loader reads; here an empty state dict
# Limits of extract_nemo, checked on the member headers before anything is written.
MAX_MEMBERS = 10_000
MAX_MEMBER_BYTES = 256 * 2**30
MAX_TOTAL_BYTES = 1024 * 2**30


class NemoCheckpointError(UnsafeTargetError):  # a ValueError; see the module docstring for NeMo's
    """A .nemo that cannot be used: unsafe, incomplete, or not fitting the model."""


class UnsafeCheckpointError(NemoCheckpointError):
    """A .nemo asks for something loading must never do (run code, read or write outside its folder)."""


def _refuse(member, reason: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"refusing {member}: {reason}")


# ------------------------------------------------------------------ the tar reader
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def extract_nemo(path: str | Path, out_dir: str | Path, only: Callable[[str], bool] | None = None) -> set[str]:
    """Extract the .nemo at ``path`` into the empty folder ``out_dir``: the members whose normalised name
    ``only`` accepts (all when None). Returns the names of the files written.

    Refused before anything is written: a compressed or non-tar file, more than ``MAX_MEMBERS`` members, a member
    over ``MAX_MEMBER_BYTES`` or all over ``MAX_TOTAL_BYTES``, a header whose data is not in the file, and any member
    that is not a plain file or folder inside ``out_dir`` (links, devices, sparse files, absolute or ``..`` paths,
    duplicates)."""
    with open(path, "rb") as f:
        head = f.read(6)
    kind = next((k for magic, k in _COMPRESSED.items() if head.startswith(magic)), None)
    if kind:
        raise UnsafeCheckpointError(f"{path}: refusing a {kind}-compressed archive: only plain tar is read (what "
                                    f"save_to writes); decompress it first")
    try:
        tar = tarfile.open(path, "r:")
    except tarfile.TarError as e:
        raise UnsafeCheckpointError(f"{path}: refusing a file that is not a plain tar archive ({e})") from e
    with tar:
        members, names, total = [], set(), 0
        try:
            for m in tar:  # headers only, one at a time: the count limit stops a huge listing early
                if len(members) == MAX_MEMBERS:
                    raise UnsafeCheckpointError(f"{path}: refusing the archive: more than MAX_MEMBERS={MAX_MEMBERS} "
                                                f"members")
                name = posixpath.normpath(m.name)
                if reason := _member_problem(m, name, names):
                    raise UnsafeCheckpointError(f"{path}: refusing unsafe archive member {m.name!r} ({reason})")
                total += m.size
                if total > MAX_TOTAL_BYTES:
                    raise UnsafeCheckpointError(f"{path}: refusing the archive: its members exceed "
                                                f"MAX_TOTAL_BYTES={MAX_TOTAL_BYTES} bytes")
                names.add(name)
                members.append((name, m))
        except tarfile.TarError as e:  # e.g. a header whose data runs past the end of the file
            raise UnsafeCheckpointError(f"{path}: refusing a damaged tar archive ({e})") from e
        written = set()
        for name, m in members:
            if only is None or only(name):
                tar.extract(m, out_dir, filter="data")  # the data filter: a second guard on paths and modes
                if m.isreg():
                    written.add(name)
    return written


def _member_problem(m: tarfile.TarInfo, name: str, names: set[str]) -> str | None:
    if m.issym() or m.islnk():
        return "a link"
    if m.issparse() or not (m.isreg() or m.isdir()):
        return "not a plain file or folder"
    if m.name.startswith("/") or name.split("/")[0] == "..":
        return "a path outside the extraction folder"
    if name in names:
        return "a duplicate"
    if m.size > MAX_MEMBER_BYTES:
        return f"{m.size} bytes, over MAX_MEMBER_BYTES={MAX_MEMBER_BYTES}"
    return None


# ------------------------------------------------------------------ unpickling
def read_weights_only(data: bytes | Path, member: str):
    """``torch.load(weights_only=True)`` of a file's bytes; anything else is refused, naming ``member``."""
    try:
        return torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _refuse(member, f"not weights-only data ({_why(e)})") from e


def _why(e: BaseException) -> str:
    """The line of torch's weights-only error that says what was refused (not its advice to load unsafely)."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    why = [s for s in lines if not s.startswith(("Weights only load failed", "Check the documentation", "Please"))]
    return (why or lines or [type(e).__name__])[0]


# Exactly the globals a DCP .metadata written by torch/Megatron holds; no dotted names, no module wildcards.
_METADATA_GLOBALS = {
    *((dcp_md.__name__, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                      "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                      "_MEM_FORMAT_ENCODING")),
    *((dcp_plan.__name__, n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                        "BytesIOWriteData")),
    (dcp_fs.__name__, "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name
    ("collections", "OrderedDict"),
    *(("torch", n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)),
}


class _MetadataUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD can be checked
    """Unpickles DCP metadata only: allow-listed globals, and state set on instances, never on a class or function
    (that would change how later code, Megatron's included, behaves)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if (module, name) not in _METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"a global {module}:{name} (not checkpoint metadata)")
        return super().find_class(module, name)

    def _build(self):
        if callable(self.stack[-2]):
            raise pickle.UnpicklingError(f"state set on {self.stack[-2]!r} (not an instance)")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _build


# ------------------------------------------------------------------ weights
_SHARD_FILE = re.compile(r"__\d+_\d+\.distcp")


def _vet_weights(folder: Path) -> None:
    """Check an extracted ``model_weights/`` and rewrite its pickles (see the module docstring); in place, so only
    ever on a folder ``extract_nemo`` just wrote."""
    if not folder.is_dir():
        raise _refuse(f"{WEIGHTS}/", "missing (not a JSTIP .nemo)")
    for p in folder.iterdir():
        if not (p.is_file() and (p.name in (".metadata", "metadata.json") or _SHARD_FILE.fullmatch(p.name))):
            raise _refuse(f"{WEIGHTS}/{p.name}", "not a file a save writes (.metadata, metadata.json, __R_I.distcp)")
    for name in (".metadata", "metadata.json"):
        if not (folder / name).is_file():
            raise _refuse(f"{WEIGHTS}/", f"no {name} (not a distributed checkpoint)")
    try:
        backend = json.loads((folder / "metadata.json").read_text()).get("sharded_backend")
    except (ValueError, AttributeError) as e:
        raise _refuse(f"{WEIGHTS}/metadata.json", f"not a JSON object ({e})") from e
    if backend != "torch_dist":
        raise _refuse(f"{WEIGHTS}/metadata.json", f"sharded_backend {backend!r}, not 'torch_dist'")
    try:
        md = _MetadataUnpickler(io.BytesIO((folder / ".metadata").read_bytes())).load()
    except Exception as e:
        raise _refuse(f"{WEIGHTS}/.metadata", f"not checkpoint metadata ({e})") from e
    if not (isinstance(md, dcp_md.Metadata) and isinstance(md.state_dict_metadata, dict)
            and isinstance(md.storage_data, dict)):
        raise _refuse(f"{WEIGHTS}/.metadata", f"a {type(md).__name__}, not a DCP Metadata")
    sizes = {p.name: p.stat().st_size for p in folder.glob("__*.distcp")}
    rewritten: dict[str, list[tuple[dcp_md.MetadataIndex, bytes]]] = {}
    for index, info in md.storage_data.items():
        item = md.state_dict_metadata.get(getattr(index, "fqn", None))
        where = f"{WEIGHTS}/.metadata (item {getattr(index, 'fqn', index)!r})"
        if not (isinstance(index, dcp_md.MetadataIndex) and isinstance(info, dcp_fs._StorageInfo)
                and isinstance(item, (dcp_md.TensorStorageMetadata, dcp_md.BytesStorageMetadata))):
            raise _refuse(where, "not a storage entry of a saved item")
        if info.relative_path not in sizes:
            raise _refuse(where, f"stored in {info.relative_path!r}, not a shard file of this checkpoint")
        if not (type(info.offset) is int and type(info.length) is int and 0 <= info.offset
                and 0 <= info.length <= sizes[info.relative_path] - info.offset):
            raise _refuse(where, f"bytes {info.offset}+{info.length} outside {info.relative_path}")
        if info.transform_descriptors:
            raise _refuse(where, f"stream transforms {info.transform_descriptors!r} (a save writes none)")
        if isinstance(item, dcp_md.BytesStorageMetadata):
            with open(folder / info.relative_path, "rb") as f:
                f.seek(info.offset)
                slot = f.read(info.length)
            obj = read_weights_only(slot, f"{WEIGHTS}/{info.relative_path} (item {index.fqn!r})")
            buf = io.BytesIO()
            torch.save(obj, buf)
            rewritten.setdefault(info.relative_path, []).append((index, buf.getvalue()))
    for file, items in rewritten.items():  # appended; the original slots are never read again
        with open(folder / file, "ab") as f:
            for index, data in items:
                offset = f.seek(0, os.SEEK_END)
                f.write(data)
                md.storage_data[index] = dataclasses.replace(md.storage_data[index], offset=offset, length=len(data))
    (folder / ".metadata").write_bytes(pickle.dumps(md))


def _load_vetted(model, folder: Path, strict: bool) -> None:
    """Load a folder ``_vet_weights`` has rewritten into ``model`` at the current TP/PP layout (Megatron reshards)."""
    strictness = StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL
    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(folder), strict=strictness)
    except CheckpointException as e:  # a BaseException: made one that callers catch, a refusal where it is one
        errors = [exc for exc, _ in e.failures.values()]
        if unsafe := next((x for x in errors if isinstance(x, pickle.UnpicklingError)), None):
            raise _refuse(f"{WEIGHTS}/", f"a tensor item is not weights-only data ({_why(unsafe)})") from None
        raise NemoCheckpointError(f"{WEIGHTS}/: {errors[0] if errors else e}") from None
    model.load_state_dict(state, strict=strict)


def load_nemo_weights(model, nemo_path: str | Path, strict: bool = True) -> None:
    """Initialise ``model``'s weights from a .nemo (e.g. a fine-tuning stage starting from a pretrained model)."""
    with tempfile.TemporaryDirectory(prefix="jstip_nemo_") as tmp, _naming(nemo_path):
        extract_nemo(nemo_path, tmp, only=lambda name: name.split("/")[0] == WEIGHTS)
        _vet_weights(Path(tmp) / WEIGHTS)
        _load_vetted(model, Path(tmp) / WEIGHTS, strict)


@contextlib.contextmanager
def _naming(nemo_path):
    """Errors about a member of the .nemo name the .nemo too."""
    try:
        yield
    except UnsafeCheckpointError as e:
        if str(nemo_path) in str(e):
            raise
        raise UnsafeCheckpointError(f"{nemo_path}: {e}") from e


# ------------------------------------------------------------------ config
# Keys that name something to instantiate; the only one accepted is the top-level ``target`` naming the model.
# SpeechPerception checks its sections' ``_target_`` against the one class it builds and never instantiates it.
_CLASS_KEYS = {"_target_", "target", "cls", "params"}
_INERT_TARGETS = {f"perception.{s}._target_" for s in ("preprocessor", "encoder", "spec_augment")}
# Keys naming local paths to read or write (ours, then NeMo ModelPT's): cleared, the .nemo carries the weights.
_PATH_KEYS = ("init_from_nemo", "llm.init_from_hf", "perception.init_from_nemo", "perception.encoder_cache_dir",
              "tokenizer.path", "train_ds", "validation_ds", "test_ds",
              "init_from_nemo_model", "init_from_pretrained_model", "init_from_ptl_ckpt",
              "nsys_profile", "memory_profile", "chakra_profile", "dump_debug_info", "dump_debug_info_to_file")
_ARTIFACT_KEYS = ("tokenizer.tokenizer_json", "tokenizer.tokenizer_config")  # what JSTIPModel registers


def _entries(node, prefix=""):
    """(dotted key, last key, value) of every entry of a plain config container, depth first."""
    pairs = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in pairs:
        yield f"{prefix}{k}", k, v
        yield from _entries(v, f"{prefix}{k}.")


def _restored_config(conf: DictConfig, folder: Path, calling_cls) -> DictConfig:
    """The config of a .nemo extracted to ``folder``, made safe to build the model from (module docstring)."""
    member = "model_config.yaml"
    for key, last, value in _entries(OmegaConf.to_container(conf, resolve=False)):
        if last in _CLASS_KEYS and key != "target" and key not in _INERT_TARGETS:
            raise _refuse(member, f"key {key!r} names a class to instantiate (only the top-level model target may)")
        if isinstance(value, str) and "${" in value:
            raise _refuse(member, f"key {key!r} is an interpolation ({value!r}); save_to writes resolved configs")
        if isinstance(value, str) and value.startswith("nemo:"):
            name = value[len("nemo:"):]
            if "/" in name or name in ("", ".", "..") or not (folder / name).is_file():
                raise _refuse(member, f"artifact {key}={value!r} is not a file of this .nemo")
    _check_target(conf.get("target"), calling_cls, member)
    conf = OmegaConf.create(OmegaConf.to_container(conf, resolve=False))  # a copy: the caller's stays as it was
    with open_dict(conf):
        for key in _PATH_KEYS:
            parent, _, last = key.rpartition(".")
            node = OmegaConf.select(conf, parent) if parent else conf
            if isinstance(node, DictConfig) and node.get(last) is not None:
                node[last] = None
    for key in _ARTIFACT_KEYS:
        if not str(OmegaConf.select(conf, key, default="")).startswith("nemo:"):
            raise _refuse(member, f"artifact {key}={OmegaConf.select(conf, key)!r} is not a file of this .nemo")
    _check_tokenizer_config(folder / conf.tokenizer.tokenizer_config[len("nemo:"):])
    return conf


def _check_tokenizer_config(path: Path) -> None:
    """transformers opens the files a tokenizer_config.json names (``tokenizer_file``, ``vocab_file``, ...) wherever
    they are, and ``auto_map`` asks for code: a .nemo's tokenizer is its two files alone."""
    try:
        keys = [k for k, v in json.loads(path.read_text()).items()
                if v is not None and (k.endswith(("_file", "_files")) or k == "auto_map")]
    except (ValueError, AttributeError) as e:
        raise _refuse(path.name, f"not a JSON object ({e})") from e
    if keys:
        raise _refuse(path.name, f"keys {keys} name files or code outside the .nemo")


def _check_target(target, calling_cls, member) -> None:
    if target is None:
        return
    if not str(target).startswith("nemo_jstip."):
        raise _refuse(member, f"target {target!r} is not a nemo_jstip model")
    cls = import_class_by_path(str(target))
    if not (isinstance(cls, type) and issubclass(cls, calling_cls)):
        raise _refuse(member, f"target {target!r} is not a {calling_cls.__name__}")


# ------------------------------------------------------------------ .nemo
_VETTING: list[str] = []  # folders of the restores under way through vetted_nemo (innermost last)


def vetted_restore_under_way() -> bool:
    """Whether the model being built is restored through :func:`vetted_nemo` (not by NeMo's generic loader)."""
    return bool(_VETTING) and AppState().nemo_file_folder == _VETTING[-1]


@contextlib.contextmanager
def vetted_nemo(restore_path, calling_cls, override_config=None, config_only: bool = False):
    """Extract the .nemo at ``restore_path`` into a fresh folder and check it; yields (folder, config made safe to
    build from). Unless ``config_only``, the weights are vetted too and NeMo's model-restore state points at the
    folder (artifacts resolve there) until the block ends."""
    with tempfile.TemporaryDirectory(prefix="jstip_nemo_") as tmp, _naming(restore_path):
        folder = Path(tmp)
        extract_nemo(restore_path, folder)
        conf = override_config if override_config is not None else folder / "model_config.yaml"
        if isinstance(conf, (str, Path)) and not Path(conf).is_file():
            raise NemoCheckpointError(f"{restore_path}: no model_config.yaml")
        conf = OmegaConf.load(conf) if isinstance(conf, (str, Path)) else conf
        conf = _restored_config(conf.model if "model" in conf else conf, folder, calling_cls)
        if config_only:
            yield folder, conf
            return
        _vet_weights(folder / WEIGHTS)
        if (folder / EMPTY_CKPT).exists() and read_weights_only(folder / EMPTY_CKPT, EMPTY_CKPT) != {}:
            raise _refuse(EMPTY_CKPT, f"not an empty state dict (the weights of a JSTIP .nemo are in {WEIGHTS}/)")
        app, before = AppState(), (AppState().is_model_being_restored, AppState().nemo_file_folder)
        _VETTING.append(tmp)
        calling_cls._set_model_restore_state(is_being_restored=True, folder=tmp)
        try:
            yield folder, conf
        finally:
            _VETTING.pop()
            app.is_model_being_restored, app.nemo_file_folder = before


def load_restored_weights(model, folder: Path, restore_path, strict: bool = True) -> None:
    """The weights of a .nemo ``vetted_nemo`` extracted to ``folder``: now, or (a model whose stage the trainer
    builds later, in ``configure_model``) from ``restore_path`` then."""
    if model.stage is None:
        model.init_from_nemo = str(Path(restore_path).resolve())
    else:
        _load_vetted(model, folder / WEIGHTS, strict)


class JSTIPSaveRestoreConnector(SaveRestoreConnector):
    """NeMo's .nemo save/restore with distributed-checkpoint weights and vetted loading (see module docstring)."""

    def save_to(self, model, save_path: str) -> str:
        save_path = Path(save_path).resolve()
        staging = save_path.with_name(f".{save_path.name}.staging")  # every rank writes its shards here
        save_shards(model.sharded_state_dict(), staging / WEIGHTS)
        if torch.distributed.get_rank() == 0:
            config_yaml = staging / self.model_config_yaml
            model.to_config_file(path2yaml_file=str(config_yaml))
            if model.has_native_or_submodules_artifacts():
                self._handle_artifacts(model, nemo_file_folder=str(staging))
                self._update_artifact_paths(model, path2yaml_file=str(config_yaml))
            torch.save({}, staging / EMPTY_CKPT)
            partial = save_path.with_name(f".{save_path.name}.partial")
            with open(partial, "wb") as f:
                with tarfile.open(fileobj=f, mode="w:") as tar:
                    tar.add(staging, arcname=".")
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, save_path)  # atomic: the .nemo is complete or absent
            shutil.rmtree(staging)
        torch.distributed.barrier()
        return str(save_path)

    def restore_from(self, calling_cls, restore_path: str, override_config_path=None, map_location=None,
                     strict: bool = True, return_config: bool = False, trainer=None, validate_access_integrity=True):
        with vetted_nemo(restore_path, calling_cls, override_config_path, config_only=return_config) as (folder, conf):
            if return_config:
                return conf
            instance = calling_cls.from_config_dict(config=conf, trainer=trainer)
            load_restored_weights(instance, folder, restore_path, strict)
        return instance
