"""`TTTLayer`: the Flax NNX sequence mixer around `ttt.ops` (Sun et al. 2024).

  x [batch, seq, embed] -> q, k, v [batch, seq, heads, head_dim]   (projections; mamba backbone:
                                                                    shared q/k projection, then a
                                                                    causal depthwise conv for each)
  q, k <- RoPE with positions relative to the mini-batch
  eta = s * base_lr * sigmoid(x . theta_h + beta_h) / head_dim      (per-token, per-head inner LR;
                                                                    s: inner-LR warmup scale, 1 at
                                                                    inference)
  z = ttt_linear / ttt_mlp (q, k, v, eta; W0, inner LN)             (fast weights read the sequence)
  y = o_proj(gate * post_norm(z))                                   (gate = gelu(x W_g), mamba only)

Decoding keeps a state whose size does not depend on the context: the inner loop's step state
and, for the mamba backbone, the last conv_kernel - 1 q/k projections.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ttt import ops
from ttt.configs import TTTLayerConfig
from ttt.inner_models import LINEAR, MLP, gelu
from ttt.rope import rotary_embedding
from ttt.sharding import constrain, partitioned

_INNER = {"linear": (LINEAR, ops.ttt_linear, ops.ttt_linear_step), "mlp": (MLP, ops.ttt_mlp, ops.ttt_mlp_step)}
_INIT_STD = 0.02


def causal_depthwise_conv(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
    """y_t = bias + sum_j weight[j] * x_{t - K + 1 + j}, zero before the sequence start.

    Args:
      x: [batch, seq, heads, head_dim]; weight: [K, heads, head_dim]; bias: [heads, head_dim].
    """
    kernel, seq_len = weight.shape[0], x.shape[1]
    padded = jnp.pad(x, [(0, 0), (kernel - 1, 0), (0, 0), (0, 0)])
    return bias + sum(weight[j] * padded[:, j:j + seq_len] for j in range(kernel))


class TTTLayer(nnx.Module):
    """TTT-Linear or TTT-MLP sequence mixer. See the module docstring for the computation."""

    def __init__(self, config: TTTLayerConfig, *, rngs: nnx.Rngs):
        self.config = config
        heads, head_dim, width = config.num_heads, config.head_dim, config.hidden_size
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        normal = nnx.initializers.normal(_INIT_STD)

        def project_in():
            return nnx.LinearGeneral(width, (heads, head_dim), use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                     kernel_init=partitioned(normal, ("embed", "heads", "head_dim")), rngs=rngs)

        def param(init, shape, logical_axes):
            return nnx.Param(partitioned(init, logical_axes)(rngs.params(), shape, param_dtype))

        if config.backbone == "mamba":
            self.qk_proj = project_in()
            conv_axes = (None, "heads", "head_dim")
            conv_shape = (config.conv_kernel, heads, head_dim)
            self.conv_q_weight = param(_conv_init, conv_shape, conv_axes)
            self.conv_k_weight = param(_conv_init, conv_shape, conv_axes)
            self.conv_q_bias = param(nnx.initializers.zeros, (heads, head_dim), conv_axes[1:])
            self.conv_k_bias = param(nnx.initializers.zeros, (heads, head_dim), conv_axes[1:])
            self.gate_proj = project_in()
        else:
            self.q_proj = project_in()
            self.k_proj = project_in()
        self.v_proj = project_in()
        self.lr_weight = param(normal, (width, heads), ("embed", "heads"))
        self.lr_bias = param(nnx.initializers.zeros, (heads,), ("heads",))
        self.token_scale_offset = param(nnx.initializers.zeros, (config.mini_batch_size,), (None,))

        inner_model = _INNER[config.inner][0]
        initial = jax.vmap(lambda key: inner_model.init(key, head_dim))(jax.random.split(rngs.params(), heads))
        self.fast_weights = nnx.Dict({
            name: param(lambda key, shape, dtype, value=value: value.astype(dtype), value.shape,
                        ("heads",) + (None,) * (value.ndim - 1))
            for name, value in initial.items()
        })
        self.inner_ln_weight = param(nnx.initializers.ones, (heads, head_dim), ("heads", "head_dim"))
        self.inner_ln_bias = param(nnx.initializers.zeros, (heads, head_dim), ("heads", "head_dim"))
        self.post_norm = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
                                       scale_init=partitioned(nnx.initializers.ones, ("embed",)),
                                       bias_init=partitioned(nnx.initializers.zeros, ("embed",)), rngs=rngs)
        self.o_proj = nnx.LinearGeneral((heads, head_dim), width, axis=(-2, -1), use_bias=False, dtype=dtype,
                                        param_dtype=param_dtype,
                                        kernel_init=partitioned(normal, ("heads", "head_dim", "embed")), rngs=rngs)

    # -- full sequences -------------------------------------------------------------------

    def __call__(self, x: jax.Array, inner_lr_scale: jax.Array | float = 1.0) -> jax.Array:
        """x: [batch, seq, embed] -> [batch, seq, embed].

        `inner_lr_scale` (a scalar, may be traced) multiplies the inner learning rate: the
        inner-LR warmup of training sets it below 1 for the first steps.
        """
        q, k, v, eta = self._project(x, jnp.arange(x.shape[1]), inner_lr_scale)
        z, _ = self._mix_sequence(q, k, v, eta)
        return self._output(z, x)

    def prefill(self, x: jax.Array):
        """Like `__call__`, and also returns the decode state after reading all of `x`.

        The whole mini-batches go through the sequence form, whose final weights start the decode
        state; the tokens of a trailing partial mini-batch then go through the step form, so the
        state continues exactly where `__call__` would.
        """
        batch, seq_len, _ = x.shape
        b = self.config.mini_batch_size
        whole = seq_len // b * b
        q, k, v, eta = self._project(x, jnp.arange(seq_len))
        state = self.init_state(batch)
        outputs = []
        if whole:
            z, final_params = self._mix_sequence(*(a[:, :, :whole] for a in (q, k, v, eta)))
            state["ttt"] = ops.init_decode_state(final_params)
            outputs.append(z)
        if whole < seq_len:
            z, state["ttt"] = self._mix_steps(*(a[:, :, whole:] for a in (q, k, v, eta)), state["ttt"])
            outputs.append(z)
        if self.config.backbone == "mamba":
            state["conv"] = self._conv_window(self.qk_proj(x), state["conv"])
        return self._output(jnp.concatenate(outputs, axis=2), x), state

    # -- decoding -------------------------------------------------------------------------

    def init_state(self, batch: int) -> dict:
        """Decode state before any token: `{"ttt": inner-loop state, "conv": [batch, K-1, heads, head_dim]}`."""
        state = {"ttt": ops.init_decode_state(self._initial_fast_weights(batch))}
        if self.config.backbone == "mamba":
            c = self.config
            state["conv"] = jnp.zeros((batch, c.conv_kernel - 1, c.num_heads, c.head_dim), jnp.dtype(c.dtype))
        return state

    def step(self, x_t: jax.Array, state: dict):
        """One token. `x_t: [batch, embed]` -> (`y_t: [batch, embed]`, new state)."""
        state = dict(state)
        x = x_t[:, None]
        position = state["ttt"]["position"][None]
        if self.config.backbone == "mamba":
            qk = self.qk_proj(x)
            window = jnp.concatenate([state["conv"], qk], axis=1)
            state["conv"] = window[:, 1:]
            q, k = self._conv_qk(window)
            q, k = q[:, -1:], k[:, -1:]
        else:
            q, k = self.q_proj(x), self.k_proj(x)
        q, k, v, eta = self._finish_projection(x, q, k, position)
        z, state["ttt"] = self._step_fn()(*(a[:, :, 0] for a in (q, k, v, eta)), state["ttt"])
        return self._output(z[:, :, None], x)[:, 0], state

    # -- pieces ---------------------------------------------------------------------------

    def _conv_qk(self, qk):
        return (causal_depthwise_conv(qk, self.conv_q_weight[...], self.conv_q_bias[...]),
                causal_depthwise_conv(qk, self.conv_k_weight[...], self.conv_k_bias[...]))

    def _conv_window(self, qk, previous):
        """The last K-1 q/k projections after `qk` [batch, seq, heads, head_dim] follows `previous`."""
        return jnp.concatenate([previous, qk.astype(previous.dtype)], axis=1)[:, -previous.shape[1]:]

    def _project(self, x, positions, inner_lr_scale=1.0):
        """x: [batch, seq, embed] -> q, k, v: [batch, heads, seq, head_dim], eta: [batch, heads, seq]."""
        x = constrain(x, ("batch", "seq", "embed"))
        if self.config.backbone == "mamba":
            q, k = self._conv_qk(self.qk_proj(x))
        else:
            q, k = self.q_proj(x), self.k_proj(x)
        return self._finish_projection(x, q, k, positions % self.config.mini_batch_size, inner_lr_scale)

    def _finish_projection(self, x, q, k, mini_batch_positions, inner_lr_scale=1.0):
        c = self.config
        q = rotary_embedding(q, mini_batch_positions, c.rope_theta)
        k = rotary_embedding(k, mini_batch_positions, c.rope_theta)
        v = self.v_proj(x)
        gate_logits = jnp.einsum("bte,eh->bth", x.astype(jnp.float32), self.lr_weight[...].astype(jnp.float32))
        eta = inner_lr_scale * c.base_lr * jax.nn.sigmoid(gate_logits + self.lr_bias[...]) / c.head_dim
        to_heads = lambda a: constrain(jnp.swapaxes(a, 1, 2), ("batch", "heads", "seq", "head_dim"))
        return to_heads(q), to_heads(k), to_heads(v), jnp.swapaxes(eta, 1, 2)

    def _token_scale(self):
        b = self.config.mini_batch_size
        return jnp.maximum(1.0 / jnp.arange(1, b + 1, dtype=jnp.float32) + self.token_scale_offset[...], 0.0)

    def _initial_fast_weights(self, batch):
        """The learnable W0 of every head, broadcast over the batch: {name: [batch, heads, ...]}."""
        return {name: jnp.broadcast_to(w[...], (batch, *w.shape)) for name, w in self.fast_weights.items()}

    def _mix_sequence(self, q, k, v, eta):
        """Sequence form over [batch, heads, seq, head_dim]; returns (z, final fast weights)."""
        c = self.config
        return _INNER[c.inner][1](q, k, v, eta, self._initial_fast_weights(q.shape[0]), self.inner_ln_weight[...],
                                  self.inner_ln_bias[...], mini_batch_size=c.mini_batch_size,
                                  token_scale=self._token_scale(), form=c.form, remat_group_size=c.remat_group_size)

    def _step_fn(self):
        """The inner step form with this layer's parameters: `(q, k, v, eta, ttt_state) -> (z, ttt_state)`."""
        c = self.config
        return functools.partial(_INNER[c.inner][2], ln_weight=self.inner_ln_weight[...], ln_bias=self.inner_ln_bias[...],
                                 mini_batch_size=c.mini_batch_size, token_scale=self._token_scale())

    def _mix_steps(self, q, k, v, eta, ttt_state):
        """Step form over the tokens of [batch, heads, seq, head_dim], from `ttt_state`."""
        step_fn = self._step_fn()

        def body(state, token):
            z, state = step_fn(*token, state)
            return state, z

        tokens = tuple(jnp.moveaxis(a, 2, 0) for a in (q, k, v, eta))
        ttt_state, z = jax.lax.scan(body, ttt_state, tokens)
        return jnp.moveaxis(z, 0, 2), ttt_state

    def _output(self, z, x):
        """z: [batch, heads, seq, head_dim], x: [batch, seq, embed] -> [batch, seq, embed]."""
        batch, heads, seq_len, head_dim = z.shape
        y = jnp.swapaxes(z, 1, 2).reshape(batch, seq_len, heads * head_dim)
        y = self.post_norm(y)
        if self.config.backbone == "mamba":
            y = gelu(self.gate_proj(x).reshape(batch, seq_len, -1)) * y
        y = self.o_proj(y.reshape(batch, seq_len, heads, head_dim))
        return constrain(y, ("batch", "seq", "embed"))


def _conv_init(key, shape, dtype):
    """Uniform(-1/sqrt(K), 1/sqrt(K)): PyTorch Conv1d's default for a depthwise kernel of width K."""
    bound = shape[0] ** -0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)
