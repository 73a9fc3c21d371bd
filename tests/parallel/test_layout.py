"""The parallel layout and the strategy's config: sizes checked up front, unknown keys named, one log line."""
import pytest

from nemo_jstip.parallel.layout import ParallelLayout
from nemo_jstip.parallel.strategy import MegatronStrategy


def test_layout_derives_dp_and_describes_itself():
    layout = ParallelLayout.for_world(8, tp=2, pp=2)
    assert (layout.dp, layout.world_size) == (2, 8)
    assert layout.describe(distributed_optimizer=True) == (
        "parallel layout: tp=2 pp=2 cp=1 dp=2 sequence_parallel=False distributed_optimizer=True")
    with pytest.raises(ValueError, match="world size 6 is not divisible by TP=4 x PP=1 x CP=1"):
        ParallelLayout.for_world(6, tp=4)
    with pytest.raises(ValueError, match="tp=0"):
        ParallelLayout(tp=0)


def test_strategy_config_rejects_unknown_keys():
    s = MegatronStrategy.from_config({"tensor_model_parallel_size": 2, "seed": 7})
    assert (s.tp, s.pp, s.seed) == (2, 1, 7)
    with pytest.raises(ValueError, match=r"strategy: unknown key\(s\) \['tensor_parallel_size'\]"):
        MegatronStrategy.from_config({"tensor_parallel_size": 2})


def test_sequence_parallel_is_a_layout_option_that_needs_tp2():
    layout = ParallelLayout.for_world(4, tp=2, cp=2, sequence_parallel=True)
    assert layout.describe() == "parallel layout: tp=2 pp=1 cp=2 dp=1 sequence_parallel=True"
    assert layout.sequence_multiple == 8 and ParallelLayout(tp=2, sequence_parallel=True).sequence_multiple == 2
    assert ParallelLayout(tp=2).sequence_multiple == 1 and ParallelLayout(cp=2).sequence_multiple == 4
    with pytest.raises(ValueError, match="sequence_parallel=True needs tensor_model_parallel_size >= 2"):
        ParallelLayout.for_world(2, tp=1, sequence_parallel=True)
    assert MegatronStrategy.from_config({"tensor_model_parallel_size": 2, "sequence_parallel": True}).sequence_parallel
    with pytest.raises(ValueError, match="got TP=1"):  # at construction, before any process starts
        MegatronStrategy.from_config({"sequence_parallel": True})
