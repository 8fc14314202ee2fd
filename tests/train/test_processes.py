"""Runs in separate processes: two JAX processes training together on localhost, and SIGTERM (preemption)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from tests.train.conftest import MICRO_FLAGS

TRAIN = "from ttt.train.cli import train_main; train_main()"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_two_processes_train_together_on_localhost(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    port = _free_port()
    processes = []
    for process_id in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))
        processes.append(subprocess.Popen(
            # transformer-tiny: the cheapest model to compile twice at once on two cores.
            [sys.executable, "-c", TRAIN, *MICRO_FLAGS, "--config=transformer-tiny", f"--workdir={workdir}",
             f"--data.data-dir={data_dir}", "--steps=3", "--multihost=True", "--evaluate=False", "--mesh.fsdp=2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-3000:]
    assert [m["step"] for m in _metrics(workdir)] == [1, 2, 3]  # written by process 0 only
    assert all(m["loss"] > 0 for m in _metrics(workdir))
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
    assert "training loss" in outputs[0] and "training loss" not in outputs[1]


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    process = subprocess.Popen(
        [sys.executable, "-c", TRAIN, *MICRO_FLAGS, f"--workdir={workdir}", f"--data.data-dir={data_dir}",
         "--steps=100000", "--checkpoint-every=100000", "--evaluate=False"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not _metrics(workdir) and time.time() < deadline and process.poll() is None:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    saved = sorted(int(step) for step in os.listdir(os.path.join(workdir, "checkpoints")) if step.isdigit())
    last_logged = _metrics(workdir)[-1]["step"]
    assert saved and saved[-1] >= last_logged >= 1
    assert f"SIGTERM: saved a checkpoint at step {saved[-1]}" in output
