"""Training metrics: analytic FLOPs for MFU, and a writer for JSONL (+ optional TensorBoard) on process 0.

FLOPs are counted analytically because XLA's cost analysis counts a scan body once, which
undercounts the layer scan and the TTT inner loop.
"""

import json
import math
import os

import jax

from ttt.configs import ModelConfig

# Dense bf16 peak FLOP/s per device, by `jax.devices()[0].device_kind` prefix. Unknown devices
# (CPUs among them) report model FLOP/s but no MFU unless `--peak-flops-per-device` is given.
PEAK_FLOPS_PER_DEVICE = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def _ttt_forward_flops_per_token(config: ModelConfig, mixer: str) -> float:
    """Inner loop of one TTT layer: the inner model's forward and gradient on k, its forward on q,
    and the mini-batch's causal (b x b) interactions of the dual form."""
    d = config.head_dim
    inner_matmul = 2 * d * d if mixer == "ttt_linear" else 2 * (2 * d * 4 * d)
    return config.num_heads * (3 * inner_matmul + 4 * config.ttt.mini_batch_size * d)


def training_flops_per_token(config: ModelConfig, num_params: int, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6 * parameters (embedding lookup excluded, the
    logits matmul included) + 3x the forward FLOPs of attention scores and TTT inner loops."""
    embedding_params = config.vocab_size * config.hidden_size if not config.tie_embeddings else 0
    forward = 0.0
    for mixer in config.mixers:
        if mixer in ("attention", "swa"):
            keys = seq_len / 2 if mixer == "attention" else min(config.attention.sliding_window, seq_len)
            forward += 2 * 2 * keys * config.hidden_size  # q.k scores and the weighted sum of v
        else:
            forward += _ttt_forward_flops_per_token(config, mixer)
    return 6 * (num_params - embedding_params) + 3 * forward


def peak_flops_per_device(override: float = 0.0) -> float:
    """`override` when positive, else the table's entry for this device kind, else 0 (unknown)."""
    if override > 0:
        return override
    kind = jax.devices()[0].device_kind
    return next((peak for prefix, peak in PEAK_FLOPS_PER_DEVICE.items() if kind.startswith(prefix)), 0.0)


def json_safe(value):
    """`value` with every non-finite float (NaN, inf) replaced by None, so that `json.dumps(..., allow_nan=False)`
    writes strict JSON (`null`), which every JSON reader accepts; dicts, lists and tuples are walked."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one JSON object per logged step to `workdir/metrics.jsonl` (process 0 only): JSON Lines, with
    `null` for a value that is not a finite number (the first line's tokens_per_s, a skipped step's loss)."""

    def __init__(self, workdir: str, *, tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._summary = None
        if self.enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as error:
                raise ValueError("--tensorboard needs the tensorboardX package: pip install tensorboardX") from error
            self._summary = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe({"step": step, **metrics}), allow_nan=False) + "\n")
        if self._summary is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._summary.add_scalar(name, value, step)

    def close(self) -> None:
        if self._summary is not None:
            self._summary.close()
