"""The .nemo format of JSTIPModel: weights as a Megatron distributed checkpoint, resharded to any TP/PP on load,
and loading that executes no code from the file.

Layout of the tar: ``model_config.yaml``, the tokenizer artifacts, ``model_weights/`` (``dist_checkpointing``
``torch_dist`` format: keys are layout-independent, e.g. global layer numbers, so a checkpoint saved at TP=2 x PP=2
loads at TP=1 and back). Every rank writes its own shards, rank 0 packs them, and the .nemo appears by an atomic
rename: a killed save leaves no file that looks valid.

Loading a stranger's .nemo: tar members that would land outside the extraction folder (absolute, ``..``, links,
devices) are refused, not skipped; the config's ``target`` must be a JSTIPModel (NeMo's allow-list then guards the
config's ``_target_``s); and every pickle in the weights is vetted before Megatron reads it. PyTorch's DCP
``.metadata`` is a plain pickle that ``FileSystemReader`` loads with ``pickle.load``: it is first unpickled here with
an allow-list of DCP's metadata classes, ``common.pt`` with ``torch.load(weights_only=True)``; tensor data and
sharded objects are read by torch/Megatron with ``weights_only=True`` already.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from nemo.core.connectors.save_restore_connector import SaveRestoreConnector
from omegaconf import OmegaConf, open_dict

WEIGHTS = "model_weights"


class UnsafeCheckpointError(ValueError):
    """A checkpoint asks for something loading must never do (run code, write outside its folder)."""


# ------------------------------------------------------------------ vetting
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # a layout by name
    ("torch", "Size"),
    ("collections", "OrderedDict"),
}


class _VettingUnpickler(pickle.Unpickler):
    """Unpickles only DCP metadata: its dataclasses/enums, torch.Size, dtypes and plain containers."""

    def __init__(self, file, name):
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str):
        ok = (
            module in _DCP_MODULES
            or (module, name) in _GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not ok:
            raise UnsafeCheckpointError(f"{self.name}: refusing to unpickle {module}.{name} (not checkpoint metadata)")
        return super().find_class(module, name)


def vet_weights(folder: str | Path) -> None:
    """Raise ``UnsafeCheckpointError`` unless every pickle under ``folder`` holds only data."""
    folder = Path(folder)
    if not (folder / ".metadata").is_file():
        raise UnsafeCheckpointError(f"{folder}: not a distributed checkpoint (no .metadata)")
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder.parent)  # as inside the .nemo
        if path.name == ".metadata":
            try:
                _VettingUnpickler(io.BytesIO(path.read_bytes()), name).load()
            except UnsafeCheckpointError:
                raise
            except Exception as e:
                raise UnsafeCheckpointError(f"{name}: unreadable checkpoint metadata ({e})") from e
        elif path.suffix == ".pt":
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UnsafeCheckpointError(f"{name}: refusing a torch file that is not weights-only ({e})") from e


def safe_extract(tar_path: str | Path, out_dir: str | Path) -> None:
    """Extract a .nemo; a link, an absolute or ``..`` path or a special file aborts the whole load (NeMo's own
    restore only skips such members)."""
    from nemo.utils.tar_utils import TarPathTraversalError
    from nemo.utils.tar_utils import safe_extract as extract_or_raise

    with tarfile.open(tar_path, "r:*") as tar:
        try:
            extract_or_raise(tar, str(out_dir))  # refuses links and paths outside; filter="data" for the rest
        except TarPathTraversalError as e:  # NeMo's message: "Skipping potentially unsafe tar member: NAME"
            member = str(e).rpartition(": ")[2]
            raise UnsafeCheckpointError(f"{tar_path}: refusing tar member {member!r} (a link or a path outside)") from e
        except tarfile.FilterError as e:
            raise UnsafeCheckpointError(f"{tar_path}: refusing tar member {e.tarinfo.name!r} ({e})") from e


# ------------------------------------------------------------------ weights
def save_weights(model, folder: str | Path) -> None:
    """All ranks: write this rank's shards of ``model.sharded_state_dict()`` into ``folder`` (shared filesystem)."""
    folder = Path(folder)
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(folder))
    torch.distributed.barrier()


def load_weights(model, folder: str | Path, strict: bool = True) -> None:
    """Vet ``folder``, then load it into ``model`` at the current TP/PP layout (Megatron reshards)."""
    vet_weights(folder)
    strictness = StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL
    state = dist_checkpointing.load(model.sharded_state_dict(), str(folder), strict=strictness)
    model.load_state_dict(state, strict=strict)


def load_nemo_weights(model, nemo_path: str | Path, strict: bool = True) -> None:
    """Initialise ``model``'s weights from a .nemo (e.g. a fine-tuning stage starting from a pretrained model)."""
    with tempfile.TemporaryDirectory(prefix="jstip_nemo_") as tmp, _naming(nemo_path):
        safe_extract(nemo_path, tmp)
        load_weights(model, Path(tmp) / WEIGHTS, strict)


@contextlib.contextmanager
def _naming(nemo_path):
    """Errors about a member of the .nemo name the .nemo too."""
    try:
        yield
    except UnsafeCheckpointError as e:
        if str(nemo_path) in str(e):
            raise
        raise UnsafeCheckpointError(f"{nemo_path}: {e}") from None


# ------------------------------------------------------------------ .nemo
class JSTIPSaveRestoreConnector(SaveRestoreConnector):
    """NeMo's .nemo save/restore with distributed-checkpoint weights and vetted loading (see module docstring)."""

    def save_to(self, model, save_path: str) -> str:
        save_path = Path(save_path).resolve()
        staging = save_path.with_name(f".{save_path.name}.staging")  # every rank writes its shards here
        save_weights(model, staging / WEIGHTS)
        if torch.distributed.get_rank() == 0:
            config_yaml = staging / self.model_config_yaml
            model.to_config_file(path2yaml_file=str(config_yaml))
            if model.has_native_or_submodules_artifacts():
                self._handle_artifacts(model, nemo_file_folder=str(staging))
                self._update_artifact_paths(model, path2yaml_file=str(config_yaml))
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
        with tempfile.TemporaryDirectory(prefix="jstip_nemo_") as tmp, _naming(restore_path):
            safe_extract(restore_path, tmp)
            conf = override_config_path if override_config_path is not None else Path(tmp) / self.model_config_yaml
            conf = OmegaConf.load(conf) if isinstance(conf, (str, Path)) else conf
            conf = conf.model if "model" in conf else conf
            if return_config:
                return conf
            _check_target(conf, calling_cls)
            with open_dict(conf):  # the weights are this file's: no pretrained parts to fetch
                conf.init_from_nemo = conf.llm.init_from_hf = conf.perception.init_from_nemo = None
            vet_weights(Path(tmp) / WEIGHTS)
            calling_cls._set_model_restore_state(is_being_restored=True, folder=tmp)
            try:
                instance = calling_cls.from_config_dict(config=conf, trainer=trainer)
            finally:
                calling_cls._set_model_restore_state(is_being_restored=False)
            if instance.stage is None:  # built later by the trainer (configure_model): load then
                instance.init_from_nemo = str(Path(restore_path).resolve())
            else:
                load_weights(instance, Path(tmp) / WEIGHTS, strict)
        return instance


def _check_target(conf, calling_cls) -> None:
    from nemo.utils.model_utils import import_class_by_path

    target = conf.get("target")
    if target is None:
        return
    if not str(target).startswith("nemo_jstip."):
        raise UnsafeCheckpointError(f"config target {target!r} is not a nemo_jstip model")
    cls = import_class_by_path(str(target))
    if not (isinstance(cls, type) and issubclass(cls, calling_cls)):
        raise UnsafeCheckpointError(f"config target {target!r} is not a {calling_cls.__name__}")


