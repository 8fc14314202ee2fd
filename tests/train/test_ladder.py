"""benchmarks/ladder.py: the rungs of Sun et al. 2024's Table 1, each one switch from the last, and its smoke run."""

import dataclasses
import json
import math
import os
import sys

from ttt import configs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import ladder  # noqa: E402
import ladder_report  # noqa: E402


def _differences(a, b) -> dict:
    return {field.name: getattr(b, field.name) for field in dataclasses.fields(a)
            if getattr(a, field.name) != getattr(b, field.name)}


def test_each_rung_differs_from_the_one_before_by_its_switches_only():
    base = configs.get(ladder.PRESET)
    models = ladder.rung_models(base, seq_len=256)
    assert len(models) == len(ladder.RUNGS) == 6
    # Rung 1 is the linear-attention limit: batch GD over the whole row, W0 = 0, no LN or residual, fixed eta.
    first = models[0].ttt
    assert (first.mini_batch_size, first.backbone) == (256, "transformer")
    assert not (first.inner_norm or first.learn_initial_weights or first.learn_inner_lr or first.learn_token_scale)
    for before, after, (_, changes, _) in zip(models, models[1:], ladder.RUNGS[1:]):
        assert _differences(before, after) == {"ttt": after.ttt}
        assert _differences(before.ttt, after.ttt) == changes
    assert models[-1] == base  # the top rung is the preset: the paper's best configuration


def test_smoke_writes_every_rung_with_a_finite_held_out_loss(data_dir, tmp_path):
    out = tmp_path / "out"
    ladder.main(["--smoke", "--out", str(out), "--workdir", str(tmp_path / "runs"), "--data-dir", data_dir])
    results = json.loads((out / ladder.LADDER_JSON).read_text())
    assert [rung["name"] for rung in results["rungs"]] == [name for name, _, _ in ladder.RUNGS]
    for rung in results["rungs"]:
        assert math.isfinite(rung["held_out"]["loss"]) and math.isfinite(rung["held_out"]["bits_per_byte"])
        assert rung["held_out"]["documents"] > 0
    assert results["budget"]["text_steps"] == ladder.SMOKE.text_steps
    assert (out / ladder.LADDER_PLOT).read_bytes()[:4] == b"\x89PNG"
    lines = ladder_report.section(ladder_report.load(str(out)))
    assert lines[0] == ladder_report.HEADING
    assert sum(line.startswith(f"| {index}. ") for index in range(1, 7) for line in lines) == 6
