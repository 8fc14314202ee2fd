"""The optimizer's schedules: the TTT inner learning-rate warmup."""

import pytest

from ttt import configs
from ttt.configs.train import OptimizerConfig
from ttt.train.optim import inner_lr_scale_schedule


def test_inner_lr_warmup_rises_linearly_from_the_start_fraction_to_one():
    schedule = inner_lr_scale_schedule(OptimizerConfig(ttt_inner_lr_warmup_steps=10, ttt_inner_lr_warmup_start=0.2))
    for step in (0, 1, 5, 9, 10, 11, 1000):
        assert float(schedule(step)) == pytest.approx(0.2 + 0.8 * min(step / 10, 1.0))


def test_the_default_start_takes_ttt_mlp_from_the_papers_001_to_01():
    schedule = inner_lr_scale_schedule(OptimizerConfig(ttt_inner_lr_warmup_steps=100))
    base = configs.get("ttt-mlp-125m").ttt.mlp_base_lr
    assert base == pytest.approx(0.1)
    assert float(schedule(0)) * base == pytest.approx(0.01)
    assert float(schedule(100)) * base == pytest.approx(0.1)


def test_without_warmup_the_scale_is_always_one():
    schedule = inner_lr_scale_schedule(OptimizerConfig())
    assert [float(schedule(step)) for step in (0, 7, 10**6)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("field,value,message", [
    ("ttt_inner_lr_warmup_steps", -1, "expected >= 0"),
    ("ttt_inner_lr_warmup_start", 1.5, "expected a fraction"),
    ("ttt_inner_lr_warmup_start", -0.1, "expected a fraction"),
])
def test_bad_warmup_settings_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=f"{field}={value}; {message}"):
        OptimizerConfig(**{field: value})
