"""The benchmark scripts' own settings and argument checks (their timings are not tested)."""

import argparse
import os
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import matmul_floor  # noqa: E402
import reference_speed  # noqa: E402
import train_step  # noqa: E402
import timing  # noqa: E402
import ttt_layer  # noqa: E402
from xla_cpu import (HUGEPAGE_TUNABLE, REDUCE_WORKAROUND, split_into_host_devices, with_hugepage_malloc,  # noqa: E402
                     with_reduce_workaround)

CPU_ARGUMENTS = dict(devices=2, xla_cpu_reduce_workaround=True, hugepage_malloc=True)


def test_reduce_workaround_is_added_once_and_keeps_other_flags():
    environment = with_reduce_workaround({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert environment["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {REDUCE_WORKAROUND}"
    assert with_reduce_workaround(dict(environment)) == environment
    assert with_reduce_workaround({})["XLA_FLAGS"] == REDUCE_WORKAROUND


def test_reduce_workaround_leaves_a_users_own_setting():
    own = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert with_reduce_workaround({"XLA_FLAGS": own})["XLA_FLAGS"] == own


def test_split_into_host_devices_adds_the_device_count_to_the_flags():
    environment = {"XLA_FLAGS": REDUCE_WORKAROUND}
    assert split_into_host_devices(1, environment) == {"XLA_FLAGS": REDUCE_WORKAROUND}
    split_into_host_devices(2, environment)
    assert environment["XLA_FLAGS"] == f"{REDUCE_WORKAROUND} --xla_force_host_platform_device_count=2"


def test_hugepage_malloc_is_added_once_and_keeps_other_tunables():
    environment = with_hugepage_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1", "PATH": "/bin"})
    assert environment == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=1:{HUGEPAGE_TUNABLE}", "PATH": "/bin"}
    assert with_hugepage_malloc(dict(environment)) == environment
    assert with_hugepage_malloc({})["GLIBC_TUNABLES"] == HUGEPAGE_TUNABLE


def test_huge_pages_restart_the_script_once_with_its_arguments_then_the_flags_are_set_once(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import argparse, os, sys
        sys.path.insert(0, {os.path.join(os.path.dirname(__file__), "..", "benchmarks")!r})
        from xla_cpu import apply_in_this_process
        print("started", sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), flush=True)
        apply_in_this_process(argparse.Namespace(**{CPU_ARGUMENTS!r}), __file__, sys.argv[1:])
        print("running", os.environ["XLA_FLAGS"], flush=True)
    """))
    environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {"XLA_FLAGS": ""}
    done = subprocess.run([sys.executable, str(script), "--seqs", "64"], capture_output=True, text=True,
                          env=environment, check=True)
    assert done.stdout.splitlines() == [
        "started ['--seqs', '64'] None",
        f"restarting with GLIBC_TUNABLES={HUGEPAGE_TUNABLE}",
        f"started ['--seqs', '64'] {HUGEPAGE_TUNABLE}",
        f"running {REDUCE_WORKAROUND} --xla_force_host_platform_device_count=2",
    ]


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


def test_interleaved_medians_compile_each_call_once_then_take_turns():
    import jax.numpy as jnp

    order = []

    def call(name):
        return lambda: order.append(name) or jnp.zeros(())

    medians = timing.interleaved_medians({"ttt": (call("ttt"), ()), "matmul": (call("matmul"), ())}, repeats=3)
    assert order == ["ttt", "matmul"] * 4  # one compiling run each, then the repetitions alternate
    assert set(medians) == {"ttt", "matmul"} and all(t >= 0 for t in medians.values())


def _product_flops(jaxpr) -> int:
    """2 * M * N * K summed over the dot_generals a jaxpr runs, a scan's body counted once per step."""
    import math

    from jax.extend import core

    flops = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            flops += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contracting)
        steps = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            if isinstance(param, (core.Jaxpr, core.ClosedJaxpr)):
                flops += steps * _product_flops(param.jaxpr if isinstance(param, core.ClosedJaxpr) else param)
    return flops


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_products_alone_run_the_products_the_benchmarks_count_and_stay_finite(inner):
    import jax
    import jax.numpy as jnp

    seq = 1024  # long enough for fast weights that diverge to show it (too large inputs did by token 80)
    shapes = (reference_speed.HIDDEN, reference_speed.HEADS, reference_speed.MINI_BATCH, reference_speed.REMAT_GROUP)
    forward, args = matmul_floor.layer_products(inner, seq, *shapes)
    inner_lr = 2 * seq * ttt_layer.HIDDEN * ttt_layer.HEADS
    expected = ttt_layer.projection_flops(seq) + inner_lr + ttt_layer.inner_flops(inner, seq)
    assert _product_flops(jax.make_jaxpr(forward)(*args).jaxpr) == expected
    # A floor: the layer itself runs at least these products (and a few more: the biases' updates, the state).
    layer, layer_args = reference_speed.project_functions(inner, seq)
    assert _product_flops(jax.make_jaxpr(layer["forward"])(*layer_args).jaxpr) >= expected
    y = forward(*args)
    assert y.shape == (1, seq, ttt_layer.HIDDEN) and bool(jnp.isfinite(y).all())


def test_products_alone_refuse_a_length_the_groups_do_not_divide():
    with pytest.raises(ValueError, match="seq 100"):
        matmul_floor.layer_products("mlp", 100, hidden=768, heads=12, mini_batch=16, group=4)


def test_ttt_layer_refuses_devices_that_do_not_split_the_heads(capsys):
    with pytest.raises(SystemExit):
        ttt_layer.main(["--devices", "5"])
    assert "--devices 5" in capsys.readouterr().err


@pytest.mark.parametrize("devices, hugepages", [(1, False), (2, True)])
def test_train_step_child_gets_its_devices_and_malloc_setting(monkeypatch, devices, hugepages):
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    started = {}

    def fake_run(command, env, **kwargs):
        started.update(command=command, env=env)
        return subprocess.CompletedProcess(command, 0, stdout='{"step_s": 1.0}\n', stderr="")

    monkeypatch.setattr(train_step.subprocess, "run", fake_run)
    args = argparse.Namespace(**CPU_ARGUMENTS | dict(devices=devices, hugepage_malloc=hugepages), repeats=3,
                              remat="full")
    row = train_step.run_child("ttt-linear-125m", 2048, "float32", args)
    assert row == {"step_s": 1.0}
    assert started["command"][-1] == str(devices)  # measure(..., devices) builds a tensor = devices mesh
    flags = started["env"]["XLA_FLAGS"].split()
    assert REDUCE_WORKAROUND in flags
    assert ("--xla_force_host_platform_device_count=2" in flags) == (devices == 2)
    assert (started["env"].get("GLIBC_TUNABLES") == HUGEPAGE_TUNABLE) == hugepages


def test_train_step_refuses_no_devices():
    with pytest.raises(SystemExit):
        train_step.main(["--devices", "0"])
