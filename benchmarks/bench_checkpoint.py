"""Host memory of a sharded training-checkpoint save, against the rank's own state.

Each layout runs on real gloo processes (CPU): a JSTIPModel (an LLM of ``--layers`` x ``--hidden``, the tiny test
encoder), one AdamW step through the engine, then ``parallel.checkpoint.save_training``. Rank 0 samples its
resident set size (``/proc/self/statm``) every millisecond during the save. Printed per layout: rank 0's own state
(its shard of the weights + its optimizer state), the RSS growth during the save (peak minus before), their ratio,
and the save time. A save that gathered other ranks' shards would show ratios of ~TP or ~DP and more.

    python benchmarks/bench_checkpoint.py [--layers 8 --hidden 1024] [--layouts tp2,dp2,dp2-distopt]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nemo_jstip.parallel.dist import spawn  # noqa: E402

LAYOUTS = {"tp1": (1, 1, False), "tp2": (2, 2, False), "dp2": (1, 2, False), "dp2-distopt": (1, 2, True)}  # (tp, ranks, distopt)
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _state_bytes(model) -> int:
    """This rank's weights plus its optimizer state (fp32 parameters: the distributed optimizer's main-weight
    shards are views of them, counted once)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = model.engine.optimizer.optimizer
    for group in opt.param_groups:
        for p in group["params"]:
            n += sum(t.numel() * t.element_size() for t in opt.state[p].values() if torch.is_tensor(t) and t.dim())
    return n


def rank_body(tok_dir: str, out_dir: str, layers: int, hidden: int, tp: int, distopt: bool) -> dict:
    from omegaconf import OmegaConf

    from nemo_jstip.models.jstip_model import JSTIPModel
    from nemo_jstip.parallel import checkpoint as ckpt
    from nemo_jstip.parallel.dist import init_parallel

    torch.set_num_threads(1)
    init_parallel(tp=tp)
    perception = {
        "preprocessor": {"sample_rate": 16000, "features": 32, "n_fft": 512, "dither": 0.0},
        "encoder": {"feat_in": 32, "n_layers": 2, "d_model": 32, "n_heads": 2, "subsampling_factor": 8,
                    "subsampling_conv_channels": 32, "ff_expansion_factor": 2},
        "adapter": {"type": "mlp", "stack": 1, "hidden_size": 64, "output_size": hidden},
    }
    cfg = OmegaConf.create({
        "tokenizer": {"path": tok_dir}, "perception": perception,
        "llm": {"num_layers": layers, "hidden_size": hidden, "ffn_hidden_size": 4 * hidden, "num_attention_heads": 8,
                "layer_spec": "local", "train_mode": "full", "vocab_size": 8192},
        "optim": {"name": "adamw", "lr": 1e-4, "use_distributed_optimizer": distopt},
    })
    model = JSTIPModel(cfg)
    model.setup_optimization(cfg.optim)
    ids = torch.randint(0, 300, (2, 64))
    none = torch.full_like(ids, -1)
    batch = {"input_ids": ids, "labels": ids, "loss_mask": torch.ones(2, 64), "audio_item": none,
             "audio_frame": none, "audio": None}
    model.engine.train_step([batch])
    own = _state_bytes(model)
    before, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    ckpt.save_training(Path(out_dir) / "ckpt", model, {}, {})
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"own_mib": own / 2**20, "growth_mib": max(peak[0] - before, 0) / 2**20, "seconds": seconds,
            "rank": torch.distributed.get_rank()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layouts", default="tp2,dp2,dp2-distopt")
    a = p.parse_args(argv)
    from nemo_jstip.prep.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 50, 300, tmp / "tok")
    print(f"LLM {a.layers} x {a.hidden} (fp32, AdamW); rank 0 during save_training")
    print(f"{'layout':<12} {'own state MiB':>14} {'RSS growth MiB':>15} {'growth/own':>11} {'save s':>7}")
    for name in a.layouts.split(","):
        tp, world, distopt = LAYOUTS[name]
        out = tmp / name
        r = spawn(rank_body, world, str(tmp / "tok"), str(out), a.layers, a.hidden, tp, distopt, timeout_s=900)[0]
        print(f"{name:<12} {r['own_mib']:>14.1f} {r['growth_mib']:>15.1f} {r['growth_mib'] / r['own_mib']:>11.2f} "
              f"{r['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
