"""The benchmark scripts' own settings and argument checks (their timings are not tested)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import reference_speed  # noqa: E402
import train_step  # noqa: E402
import ttt_layer  # noqa: E402
from xla_cpu import REDUCE_WORKAROUND, split_into_host_devices, with_reduce_workaround  # noqa: E402


def test_reduce_workaround_is_added_once_and_keeps_other_flags():
    environment = with_reduce_workaround({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert environment["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {REDUCE_WORKAROUND}"
    assert with_reduce_workaround(dict(environment)) == environment
    assert with_reduce_workaround({})["XLA_FLAGS"] == REDUCE_WORKAROUND


def test_reduce_workaround_leaves_a_users_own_setting():
    own = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert with_reduce_workaround({"XLA_FLAGS": own})["XLA_FLAGS"] == own


def test_split_into_host_devices_adds_the_device_count_to_the_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", REDUCE_WORKAROUND)
    split_into_host_devices(1)
    assert os.environ["XLA_FLAGS"] == REDUCE_WORKAROUND
    split_into_host_devices(2)
    assert os.environ["XLA_FLAGS"] == f"{REDUCE_WORKAROUND} --xla_force_host_platform_device_count=2"


def test_reference_speed_refuses_lengths_the_reference_layer_cannot_run(tmp_path):
    with pytest.raises(SystemExit):
        reference_speed.main(["--reference-repo", str(tmp_path), "--seqs", "100"])


def test_reference_speed_refuses_a_directory_without_the_reference_layer(tmp_path):
    with pytest.raises(SystemExit):
        reference_speed.main(["--reference-repo", str(tmp_path), "--seqs", "2048"])


def test_reference_speed_refuses_devices_that_do_not_split_the_heads(tmp_path, capsys):
    (tmp_path / "ttt" / "models").mkdir(parents=True)
    (tmp_path / "ttt" / "models" / "ttt_layer.py").touch()
    with pytest.raises(SystemExit):
        reference_speed.main(["--reference-repo", str(tmp_path), "--seqs", "2048", "--devices", "5"])
    assert "--devices 5" in capsys.readouterr().err


def test_reference_sharding_constraints_name_this_projects_mesh_axes():
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    from ttt.configs.train import MeshConfig
    from ttt.train import mesh as mesh_lib

    x = jnp.arange(24.0).reshape(1, 4, 6)
    spec = PartitionSpec(("dp", "fsdp"), None, "mp")  # as the reference layer writes them
    assert reference_speed._reference_sharding_constraint(x, spec) is x  # no mesh: the identity
    # tests/conftest.py splits the CPU into 8 host devices.
    with mesh_lib.activate(mesh_lib.make_mesh(MeshConfig(data=1, tensor=2), devices=jax.devices()[:2])):
        y = jax.jit(lambda x: reference_speed._reference_sharding_constraint(x, spec))(x)
    assert y.sharding.shard_shape(x.shape) == (1, 4, 3)  # the last axis split over `tensor`, as `mp`
    assert jnp.array_equal(y, x)


def test_train_step_compares_each_dtype_with_the_transformer_of_that_dtype(capsys):
    row = lambda preset, dtype, step_s: {"preset": preset, "seq": 2048, "dtype": dtype, "step_s": step_s,
                                         "tokens_per_s": 2048 / step_s, "peak_rss_gib": 1.0}
    train_step.print_table([row("transformer-125m", "float32", 20.0), row("ttt-linear-125m", "float32", 10.0),
                            row("transformer-125m", "bfloat16", 12.0), row("ttt-linear-125m", "bfloat16", 8.0)])
    # preset, seq, dtype, step s, tokens/s, vs transformer, peak GiB
    ratios = {(cells[0], cells[2]): cells[5] for cells in map(str.split, capsys.readouterr().out.splitlines())
              if cells and cells[0].endswith("125m")}
    assert ratios == {("transformer-125m", "float32"): "1.00x", ("ttt-linear-125m", "float32"): "2.00x",
                      ("transformer-125m", "bfloat16"): "1.00x", ("ttt-linear-125m", "bfloat16"): "1.50x"}


def test_train_step_refuses_an_unknown_dtype():
    with pytest.raises(SystemExit):
        train_step.main(["--dtypes", "float16"])


def test_ttt_layer_sweep_on_devices_splits_the_heads_and_keeps_the_values():
    import jax
    import numpy as np

    inputs = ttt_layer.op_inputs(64, "mlp")
    split = ttt_layer.split_heads(inputs, 2)  # tests/conftest.py splits the CPU into 8 host devices
    q, ln_weight = split[0], split[5]
    assert q.sharding.shard_shape(q.shape) == (1, 6, 64, 64)
    assert ln_weight.sharding.shard_shape(ln_weight.shape) == (6, 64)
    op = jax.jit(ttt_layer.ttt_op("mlp", "dual"))
    np.testing.assert_allclose(op(*split), op(*inputs), rtol=1e-5, atol=1e-5)


def test_ttt_layer_refuses_devices_that_do_not_split_the_heads(capsys):
    with pytest.raises(SystemExit):
        ttt_layer.main(["--devices", "5"])
    assert "--devices 5" in capsys.readouterr().err
