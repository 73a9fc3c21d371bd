"""megatron-core on a machine without CUDA: the one place that patches it, and only there.

megatron-core 0.19 hard-codes CUDA in code that is otherwise device-agnostic (about 200
``torch.cuda.current_device()`` calls, about 70 ``device="cuda"`` literals). On a CUDA machine ``apply()``
does nothing, so the GPU path runs Megatron unpatched. Without CUDA it patches, in order of reach:

1. ``torch.cuda.current_device`` -> ``torch.device("cpu")``, ``torch.cuda.synchronize`` -> no-op and
   ``torch.cuda.current_stream`` -> a stream whose waits are no-ops (Megatron DDP's grad sync).
   The calls are spread over ~40 Megatron modules (global memory buffer, RoPE, attention, linears,
   tensor-parallel mappings, p2p, DDP buffers, dist-checkpointing, timers), all written as
   ``torch.cuda.<fn>()`` lookups, so the two functions are replaced on ``torch.cuda`` itself (nothing else
   of ``torch.cuda``). Without CUDA both would raise anyway, so no working code path changes meaning.
2. ``torch`` as seen by a few Megatron modules (``_DEVICE_LITERAL_MODULES``): a proxy whose tensor
   factories map ``device="cuda"`` to the CPU. Covers the schedules' token counter (every schedule, even
   ``forward_backward_no_pipelining``), the default causal mask of the unfused softmax (attention without
   an explicit mask) and ``broadcast_data``.
3. ``Tensor.cuda()`` made the identity, only while two Megatron functions run: ``LanguageModule.
   setup_embeddings_and_output_layer`` (tied embeddings with PP > 1 all-reduce the output layer's initial copy
   after moving it to the GPU) and ``tensor_parallel.broadcast_data``.
4. The model-parallel RNG tracker (``tensor_parallel.random``): ``CudaRNGStatesTracker`` is replaced by a
   subclass that keeps its named states as CPU generator states, and ``_get/_set_cuda_rng_state`` read/write
   the CPU generator. So ``model_parallel_cuda_manual_seed`` works, dropout inside ``tracker.fork()`` draws
   from the tensor-parallel stream, and activation recompute restores the right state.
5. Megatron's multi-tensor fallbacks without TE/apex (grad norm, clip scaling, weight copies) as
   ``torch._foreach`` ops (``foreach_multi_tensor``): the same results, one op per list instead of per tensor.
6. Not a Megatron patch, but the one CPU-only setting of the process: glibc's allocator keeps the memory a step
   frees for the next step (``keep_freed_memory``) instead of handing it back to the kernel and page-faulting it
   in again.

Measured to work with it (tests/parallel/test_cpu_shim.py): RNG tracker + dropout + recompute, TP, PP 1F1B,
plain ``dist_checkpointing.save/load`` (resharding TP=2 -> 1). Sequence parallelism needs nothing here: gloo in
torch 2.14 has ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` (Megatron's SP collectives), and what
refused it on the CPU, the local spec's torch norms, refuses it on any GPU without TE or apex too, so its fix is
in ``modules/llm.py`` (tests/models/test_parallel.py runs TP=2 with SP). Not covered, still CUDA-only here:
Megatron's optimizer (``get_megatron_optimizer``, clip-grad/l2-norm: use a torch optimizer), the rerun state
machine's non-default modes, dist-checkpointing's cached-structure saves and fully-parallel load exchange.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import os
import types

import torch

# Megatron modules whose ``device="cuda"`` literals sit on a path we run on the CPU.
_DEVICE_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.optimizer.optimizer",  # the optimizer wrappers' loss-scale and flag tensors
    "megatron.core.optimizer.clip_grads",  # grad-norm and zero-count accumulators
    "megatron.core.utils",  # the local (no TE/apex) multi-tensor L2 norm's result
)
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "empty_like", "zeros_like", "ones_like")

_applied = False
_originals: dict = {}

# glibc mallopt(3) parameters and values for ``keep_freed_memory``.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM_THRESHOLD = 1 << 30


def needed() -> bool:
    """True when the shim applies: CUDA is absent."""
    return not torch.cuda.is_available()


def is_active() -> bool:
    return _applied


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


class _CpuStream:
    """``torch.cuda.current_stream()`` for Megatron DDP's grad sync, which waits on CUDA-graph events (none here)."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


def _cpu_current_stream(device=None) -> _CpuStream:
    return _CpuStream()


def _noop_synchronize(device=None) -> None:
    return None


def _map_device(device):
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CpuDeviceTorch(types.ModuleType):
    """``torch`` for one Megatron module: the same module, except factories send ``device="cuda"`` to the CPU."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            fn = getattr(torch, name)
            setattr(self, name, self._mapped(fn))

    @staticmethod
    def _mapped(fn):
        def factory(*args, device=None, **kwargs):
            return fn(*args, device=_map_device(device), **kwargs)

        factory.__name__ = fn.__name__
        return factory

    def __getattr__(self, name):  # everything else is the real torch
        return getattr(torch, name)


def _tensor_methods_while_running(fn, **methods):
    """``fn`` with ``torch.Tensor`` methods replaced while it runs (the originals would raise here anyway)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        saved = {name: getattr(torch.Tensor, name) for name in methods}
        for name, method in methods.items():
            setattr(torch.Tensor, name, method)
        try:
            return fn(*args, **kwargs)
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)

    return wrapper


def _tensor_cuda_is_identity(fn):
    """``fn`` with ``Tensor.cuda`` returning the tensor itself while it runs."""
    return _tensor_methods_while_running(fn, cuda=lambda self, *a, **k: self)


_TYPE = torch.Tensor.type


def _cuda_type_names(fn):
    """``fn`` with ``Tensor.type()`` naming CPU tensors as CUDA ones (``torch.FloatTensor`` ->
    ``torch.cuda.FloatTensor``): Megatron's optimizers pick fp32/fp16 paths and assert by these names."""

    def type_(self, dtype=None, *args, **kwargs):
        if dtype is None and not args and not kwargs:
            name = _TYPE(self)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return _TYPE(self, dtype, *args, **kwargs)

    return _tensor_methods_while_running(fn, type=type_)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False) -> None:
    torch.set_rng_state(new_state)


def _cpu_tracker_class(base):
    """``CudaRNGStatesTracker`` whose named states are CPU generator states (what dropout on the CPU uses)."""

    class CpuRNGStatesTracker(base):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def apply() -> bool:
    """Patch megatron-core for the CPU if CUDA is absent; idempotent. Returns whether the shim is active.

    Call before ``model_parallel_cuda_manual_seed`` (it creates the RNG tracker); ``parallel.dist.init_parallel``
    does.
    """
    global _applied
    if _applied or not needed():
        return _applied
    from megatron.core.tensor_parallel import random as mrandom

    _originals["torch.cuda"] = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.current_stream)
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _noop_synchronize
    torch.cuda.current_stream = _cpu_current_stream

    for name in _DEVICE_LITERAL_MODULES:
        module = importlib.import_module(name)
        _originals[name] = module.torch
        module.torch = _CpuDeviceTorch()

    from megatron.core import tensor_parallel
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel import data as tp_data

    _originals["cuda()"] = (LanguageModule.setup_embeddings_and_output_layer, tp_data.broadcast_data)
    LanguageModule.setup_embeddings_and_output_layer = _tensor_cuda_is_identity(
        LanguageModule.setup_embeddings_and_output_layer
    )
    tp_data.broadcast_data = tensor_parallel.broadcast_data = _tensor_cuda_is_identity(tp_data.broadcast_data)

    from megatron.core.optimizer import distrib_optimizer, optimizer

    _originals["type()"] = (optimizer.clip_grad_by_total_norm_fp32, distrib_optimizer.DistributedOptimizer.__init__,
                            optimizer.Float16OptimizerWithFloat16Params.__init__)
    optimizer.clip_grad_by_total_norm_fp32 = _cuda_type_names(optimizer.clip_grad_by_total_norm_fp32)
    distrib_optimizer.DistributedOptimizer.__init__ = _cuda_type_names(distrib_optimizer.DistributedOptimizer.__init__)
    optimizer.Float16OptimizerWithFloat16Params.__init__ = _cuda_type_names(
        optimizer.Float16OptimizerWithFloat16Params.__init__)

    _originals["random"] = (mrandom.CudaRNGStatesTracker, mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state)
    mrandom.CudaRNGStatesTracker = _cpu_tracker_class(mrandom.CudaRNGStatesTracker)
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    if mrandom._CUDA_RNG_STATE_TRACKER is not None and not isinstance(
        mrandom._CUDA_RNG_STATE_TRACKER, mrandom.CudaRNGStatesTracker
    ):  # a CUDA tracker made before apply() cannot work here: let the next seed call rebuild it
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    _originals["multi-tensor"] = foreach_multi_tensor()
    keep_freed_memory()
    _applied = True
    return True


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MiB and up to 1 GiB of free heap top for reuse.

    Why: PyTorch's CPU tensors come from malloc. By default glibc serves blocks above its adaptive mmap threshold
    with fresh ``mmap``s and trims a free heap top above twice that threshold, so every training step returns its
    activations to the kernel and page-faults them in again (zero-filled): on the tiny recipe 20-30 thousand minor
    faults, ~100 MB, per step. With these settings the process's heap stays at its peak and a step reuses it;
    ``benchmarks/bench_salm.py`` prints the faults per step. Blocks above 32 MiB (glibc's limit for the threshold)
    are still mapped per use. Process-wide and not undone by ``remove()``. Returns whether glibc took both settings
    (False with another C library).
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        libc = ctypes.CDLL(None)
    except (ValueError, OSError, AttributeError):
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    return bool(mmap_ok and trim_ok)


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    norms = torch._foreach_norm(tensor_lists[0], 2.0)
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, factor):
    src, dst = tensor_lists
    if factor == 1.0:
        torch._foreach_copy_(dst, src)
    elif all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, factor)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, factor))


def _foreach_copy(this, that, overflow_buf=None):
    torch._foreach_copy_(that, this)


def foreach_multi_tensor() -> tuple:
    """Megatron's multi-tensor helpers (grad norm, clip scaling, main -> model weight copies) as ``torch._foreach``
    ops, replacing megatron-core's fallbacks without TE or apex: a Python loop with one op per tensor (and, in the
    l2 norm, one host read per tensor). Part of ``apply()``; ``benchmarks/bench_gpu.py --foreach`` applies it on a
    GPU without TE/apex to measure it. Returns the replaced functions."""
    from megatron.core.optimizer import clip_grads, optimizer

    old = (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl,
           optimizer._multi_tensor_copy_this_to_that)
    clip_grads.l2_norm_impl = _foreach_l2_norm
    clip_grads.multi_tensor_scale_impl = optimizer.multi_tensor_scale_impl = _foreach_scale
    optimizer._multi_tensor_copy_this_to_that = _foreach_copy
    return old


def remove() -> None:
    """Undo ``apply()``'s patches (tests use it to check the shim's reach); the allocator settings stay."""
    global _applied
    if not _applied:
        return
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.current_stream = _originals.pop("torch.cuda")
    for name in _DEVICE_LITERAL_MODULES:
        importlib.import_module(name).torch = _originals.pop(name)
    from megatron.core import tensor_parallel
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel import data as tp_data

    LanguageModule.setup_embeddings_and_output_layer, tp_data.broadcast_data = _originals.pop("cuda()")
    tensor_parallel.broadcast_data = tp_data.broadcast_data
    from megatron.core.optimizer import distrib_optimizer, optimizer

    (optimizer.clip_grad_by_total_norm_fp32, distrib_optimizer.DistributedOptimizer.__init__,
     optimizer.Float16OptimizerWithFloat16Params.__init__) = _originals.pop("type()")
    mrandom.CudaRNGStatesTracker, mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state = _originals.pop("random")
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    from megatron.core.optimizer import clip_grads

    (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl,
     optimizer._multi_tensor_copy_this_to_that) = _originals.pop("multi-tensor")
    _applied = False
