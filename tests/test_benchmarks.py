"""The benchmark scripts' own settings and argument checks (their timings are not tested)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import reference_speed  # noqa: E402
from xla_cpu import REDUCE_WORKAROUND, with_reduce_workaround  # noqa: E402


def test_reduce_workaround_is_added_once_and_keeps_other_flags():
    environment = with_reduce_workaround({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert environment["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {REDUCE_WORKAROUND}"
    assert with_reduce_workaround(dict(environment)) == environment
    assert with_reduce_workaround({})["XLA_FLAGS"] == REDUCE_WORKAROUND


def test_reduce_workaround_leaves_a_users_own_setting():
    own = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert with_reduce_workaround({"XLA_FLAGS": own})["XLA_FLAGS"] == own


def test_reference_speed_refuses_lengths_the_reference_layer_cannot_run(tmp_path):
    with pytest.raises(SystemExit):
        reference_speed.main(["--reference-repo", str(tmp_path), "--seqs", "100"])


def test_reference_speed_refuses_a_directory_without_the_reference_layer(tmp_path):
    with pytest.raises(SystemExit):
        reference_speed.main(["--reference-repo", str(tmp_path), "--seqs", "2048"])
