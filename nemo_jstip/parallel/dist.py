"""Process groups and Megatron parallel state for scripts and tests, plus a small multi-process launcher.

``init_parallel`` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
a single process without it), picks NCCL with CUDA and gloo without, applies the CPU shim when CUDA is
absent, builds Megatron's groups and seeds the RNGs like Megatron-LM (per pipeline stage, the same on all
TP/DP ranks), so CPU-initialised weights at TP=N are exactly the TP=1 weights, split (given the same
padded vocabulary).

``spawn`` runs a function on N real processes and returns each rank's result; a rank's exception or a
hang becomes an error in the caller, with that rank's traceback. Without CUDA the ranks fork from a
forkserver that has already imported torch and megatron-core (the first call pays ~7 s of imports, later
ones start in well under a second); with CUDA they are spawned fresh.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from nemo_jstip.parallel import cpu, layout
from nemo_jstip.parallel.layout import ParallelLayout


def init_parallel(
    tp: int = 1, pp: int = 1, *, vpp: int | None = None, cp: int = 1, seed: int = 1234, timeout_s: float = 300,
    sequence_parallel: bool = False,
) -> None:
    """Initialise torch.distributed (if needed), Megatron's model-parallel groups and RNG state.
    ``sequence_parallel`` (TP >= 2) is recorded for ``ParallelLayout.current()``, which models built afterwards
    read (``modules/llm.transformer_config``)."""
    from megatron.core import parallel_state, tensor_parallel

    ParallelLayout(tp=tp, pp=pp, cp=cp, sequence_parallel=sequence_parallel)  # checks the sizes before any group
    cpu.apply()
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
    )
    layout._sequence_parallel = sequence_parallel
    # As Megatron-LM's _set_random_seed: stages differ (their layers must not start equal), TP and DP
    # ranks agree (CPU-initialised weights are drawn whole, then split: the same at any TP size).
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def compute_device() -> torch.device:
    """Where this rank computes: its current GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    layout._sequence_parallel = False
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PRELOAD = ["torch", "megatron.core", "megatron.core.models.gpt", "nemo_jstip.parallel.dist"]


def _rank_main(rank: int, world_size: int, port: int, payload: bytes, results) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        fn, args, kwargs = pickle.loads(payload)
        out = ("ok", fn(*args, **kwargs))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        out = ("error", traceback.format_exc())
    try:
        destroy_parallel()
    except Exception:  # noqa: BLE001 - a failed rank may leave groups half-built
        pass
    results.put((rank, pickle.dumps(out)))  # plain pickle: tensors travel by value, not shared memory


def spawn(fn, world_size: int, *args, timeout_s: float = 120, **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` processes; return the per-rank results in rank order.

    ``fn`` must be importable (module level) and its results picklable. Each rank has the torchrun
    environment set; ``fn`` usually starts with ``init_parallel(tp, pp)``.
    """
    import torch.multiprocessing as mp

    if torch.cuda.is_available():  # a forked child cannot use CUDA if its parent touched it
        ctx = mp.get_context("spawn")
    else:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
    results = ctx.Queue()
    payload = pickle.dumps((fn, args, kwargs))
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, payload, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    outs, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(outs) < world_size:
            try:
                rank, blob = results.get(timeout=0.5)
                outs[rank] = pickle.loads(blob)
                continue
            except queue_mod.Empty:
                pass
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outs]
            if dead:
                raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"spawn({fn.__name__}, {world_size}) ran past {timeout_s} s; ranks done: {sorted(outs)}")
            errors = [(r, o[1]) for r, o in outs.items() if o[0] == "error"]
            if errors:  # the other ranks are likely stuck in a collective: stop waiting for them
                break
    finally:
        for p in procs:
            p.join(timeout=5 if len(outs) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
                p.join()
    errors = [(r, o[1]) for r, o in sorted(outs.items()) if o[0] == "error"]
    if errors:
        rank, tb = errors[0]
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{tb}")
    return [outs[r][1] for r in range(world_size)]
