"""`TTTLayer`: the Flax NNX sequence mixer around `ttt.ops` (Sun et al. 2024).

  x [batch, seq, embed] -> q, k, v [batch, seq, heads, head_dim]   (projections, one backward for all
                                                                    of them, ttt/projection.py; mamba
                                                                    backbone: shared q/k projection,
                                                                    then a causal depthwise conv each)
  q, k <- RoPE with positions relative to the mini-batch
  eta = s * base_lr * sigmoid(x . theta_h + beta_h) / head_dim      (per-token, per-head inner LR;
                                                                    s: inner-LR warmup scale, 1 at
                                                                    inference)
  z = ttt_linear / ttt_mlp (q, k, v, eta; W0, inner LN)             (fast weights read the sequence)
  y = o_proj(gate * post_norm(z))                                   (gate = gelu(x W_g), mamba only)

The ablation switches of the config (Sun et al. 2024, Table 1; configs/ttt.py) remove parameters:
`inner_norm=False` the inner LN (and the residual of f), `learn_initial_weights=False` W0 (then 0),
`learn_inner_lr=False` the gate (eta = s * base_lr / head_dim), `learn_token_scale=False` the
offset of the 1/i token scale.

`extend(x, state, context)` is the one forward: it reads x from a state (the initial one when None)
and returns the state after it, whose size does not depend on the context: the inner loop's decode
state and, for the mamba backbone, the last conv_kernel - 1 q/k projections. With
`context.document_starts`, the fast weights restart from W0 at every document start (which must fall
where a mini-batch begins, counting from the state's position) and the convolutions read nothing
before it (ttt/documents.py).
"""

import types

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ttt import ops
from ttt.configs import TTTLayerConfig
from ttt.context import DEFAULT, Context
from ttt.conv import causal_depthwise_conv, next_history
from ttt.inner_models import LINEAR, MLP, gelu
from ttt.projection import project
from ttt.rope import rotary_embedding
from ttt.sharding import constrain, partitioned

_INNER = {
    "linear": types.SimpleNamespace(model=LINEAR, step=ops.ttt_linear_step, extend=ops.ttt_linear_extend),
    "mlp": types.SimpleNamespace(model=MLP, step=ops.ttt_mlp_step, extend=ops.ttt_mlp_extend),
}


class TTTLayer(nnx.Module):
    """TTT-Linear or TTT-MLP sequence mixer. See the module docstring for the computation."""

    def __init__(self, config: TTTLayerConfig, *, rngs: nnx.Rngs):
        self.config = config
        heads, head_dim, width = config.num_heads, config.head_dim, config.hidden_size
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        normal = nnx.initializers.normal(config.init_std)

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
        if config.learn_inner_lr:
            self.lr_weight = param(normal, (width, heads), ("embed", "heads"))
            self.lr_bias = param(nnx.initializers.zeros, (heads,), ("heads",))
        if config.learn_token_scale:
            self.token_scale_offset = param(nnx.initializers.zeros, (config.mini_batch_size,), (None,))

        if config.learn_initial_weights:
            inner_model = _INNER[config.inner].model
            initial = jax.vmap(lambda key: inner_model.init(key, head_dim))(jax.random.split(rngs.params(), heads))
            self.fast_weights = nnx.Dict({
                name: param(lambda key, shape, dtype, value=value: value.astype(dtype), value.shape,
                            ("heads",) + (None,) * (value.ndim - 1))
                for name, value in initial.items()
            })
        if config.inner_norm:
            self.inner_ln_weight = param(nnx.initializers.ones, (heads, head_dim), ("heads", "head_dim"))
            self.inner_ln_bias = param(nnx.initializers.zeros, (heads, head_dim), ("heads", "head_dim"))
        self.post_norm = nnx.LayerNorm(width, epsilon=config.norm_eps, dtype=dtype, param_dtype=param_dtype,
                                       scale_init=partitioned(nnx.initializers.ones, ("embed",)),
                                       bias_init=partitioned(nnx.initializers.zeros, ("embed",)), rngs=rngs)
        self.o_proj = nnx.LinearGeneral((heads, head_dim), width, axis=(-2, -1), use_bias=False, dtype=dtype,
                                        param_dtype=param_dtype,
                                        kernel_init=partitioned(normal, ("heads", "head_dim", "embed")), rngs=rngs)

    # -- the forward ----------------------------------------------------------------------

    def __call__(self, x: jax.Array, context: Context = DEFAULT) -> jax.Array:
        """x: [batch, seq, embed] -> [batch, seq, embed], read from the initial state."""
        return self.extend(x, None, context)[0]

    def extend(self, x: jax.Array, state: dict | None = None, context: Context = DEFAULT) -> tuple[jax.Array, dict]:
        """Reads x [batch, seq, embed] from `state` (None: the initial state) -> (y [batch, seq, embed], state after x).

        The state may sit anywhere inside a mini-batch; reading a then b equals reading a + b. One token
        from a state takes the O(1) step form; more tokens take the sequence form (ttt.continuation).
        """
        batch, seq_len, _ = x.shape
        state = self.init_state(batch) if state is None else dict(state)
        x = constrain(x, ("batch", "seq", "embed"))
        starts = context.document_starts
        if self.config.backbone == "mamba":
            qk, v, gate = self._project(x, self.qk_proj, self.v_proj, self.gate_proj)
            history = state["conv"]
            q = causal_depthwise_conv(qk, self.conv_q_weight[...], self.conv_q_bias[...], history, starts)
            k = causal_depthwise_conv(qk, self.conv_k_weight[...], self.conv_k_bias[...], history, starts)
            state["conv"] = next_history(history, qk, starts)
        else:
            (q, k, v), gate = self._project(x, self.q_proj, self.k_proj, self.v_proj), None
        with jax.ensure_compile_time_eval():
            positions = (state["ttt"]["position"] + jnp.arange(seq_len)) % self.config.mini_batch_size
        q, k, v, eta = self._finish_projection(x, q, k, v, positions, context.inner_lr_scale)
        c = self.config
        inner_ln = (self.inner_ln_weight[...], self.inner_ln_bias[...]) if c.inner_norm else (None, None)
        inner = dict(ln_weight=inner_ln[0], ln_bias=inner_ln[1], mini_batch_size=c.mini_batch_size,
                     token_scale=self._token_scale(), residual=c.inner_norm)
        if seq_len == 1 and starts is None:
            z, state["ttt"] = _INNER[c.inner].step(*(a[:, :, 0] for a in (q, k, v, eta)), state["ttt"], **inner)
            z = z[:, :, None]
        else:
            if starts is not None:
                inner.update(document_starts=starts, initial_params=self._initial_fast_weights(batch))
            z, state["ttt"] = _INNER[c.inner].extend(q, k, v, eta, state["ttt"], form=c.form,
                                                     remat_group_size=c.remat_group_size, **inner)
        return self._output(z, gate), state

    # -- state ----------------------------------------------------------------------------

    def init_state(self, batch: int) -> dict:
        """State before any token: `{"ttt": {"params", "grad_sum", "position"}}` (the inner loop's decode
        state, see ttt.ops) and, for the mamba backbone, `"conv"`: the last conv_kernel - 1 q/k
        projections [batch, K-1, heads, head_dim]."""
        state = {"ttt": ops.init_decode_state(self._initial_fast_weights(batch))}
        if self.config.backbone == "mamba":
            c = self.config
            state["conv"] = jnp.zeros((batch, c.conv_kernel - 1, c.num_heads, c.head_dim), jnp.dtype(c.dtype))
        return state

    def state_axes(self) -> dict:
        """Logical axis names of every array of the state (the structure of `init_state`)."""
        shapes = _INNER[self.config.inner].model.param_shapes(self.config.head_dim)
        weights = {name: P("batch", "heads", *(None,) * len(shape)) for name, shape in shapes.items()}
        axes = {"ttt": {"params": weights, "grad_sum": dict(weights), "position": P()}}
        if self.config.backbone == "mamba":
            axes["conv"] = P("batch", None, "heads", "head_dim")
        return axes

    # -- pieces ---------------------------------------------------------------------------

    def _project(self, x, *projections):
        """x [batch, seq, embed] through the kernels [embed, heads, head_dim] of `projections` (nnx.LinearGeneral
        modules, which hold the parameters) -> one [batch, seq, heads, head_dim] each, with one backward
        for all of them (ttt/projection.py)."""
        return project(x, tuple(p.kernel[...] for p in projections), self.config.dtype)

    def _finish_projection(self, x, q, k, v, mini_batch_positions, inner_lr_scale=1.0):
        c = self.config
        q = rotary_embedding(q, mini_batch_positions, c.rope_theta, c.rope_pairing)
        k = rotary_embedding(k, mini_batch_positions, c.rope_theta, c.rope_pairing)
        eta = inner_lr_scale * c.base_lr * self._inner_lr_gate(x) / c.head_dim
        to_heads = lambda a: constrain(jnp.swapaxes(a, 1, 2), ("batch", "heads", "seq", "head_dim"))
        return to_heads(q), to_heads(k), to_heads(v), jnp.swapaxes(eta, 1, 2)

    def _inner_lr_gate(self, x):
        """sigmoid(x . theta_h + beta_h) [batch, seq, heads] in float32; 1 without a learned gate."""
        if not self.config.learn_inner_lr:
            return jnp.ones((*x.shape[:2], self.config.num_heads), jnp.float32)
        gate_logits = jnp.einsum("bte,eh->bth", x.astype(jnp.float32), self.lr_weight[...].astype(jnp.float32))
        return jax.nn.sigmoid(gate_logits + self.lr_bias[...])

    def _token_scale(self):
        """s_i, i = 1..b: [b]; 1/i plus the learned offset (clipped at 0), or 1/i without one."""
        b = self.config.mini_batch_size
        scale = 1.0 / jnp.arange(1, b + 1, dtype=jnp.float32)
        if not self.config.learn_token_scale:
            return scale
        return jnp.maximum(scale + self.token_scale_offset[...], 0.0)

    def _initial_fast_weights(self, batch):
        """W0 of every head, broadcast over the batch: {name: [batch, heads, ...]}; learned, or zeros."""
        c = self.config
        if not c.learn_initial_weights:
            shapes = _INNER[c.inner].model.param_shapes(c.head_dim)
            return {name: jnp.zeros((batch, c.num_heads, *shape), jnp.float32) for name, shape in shapes.items()}
        return {name: jnp.broadcast_to(w[...], (batch, *w.shape)) for name, w in self.fast_weights.items()}

    def _output(self, z, gate):
        """z: [batch, heads, seq, head_dim], gate: the gate projection [batch, seq, heads, head_dim] or None
        -> [batch, seq, embed]."""
        batch, heads, seq_len, head_dim = z.shape
        # Normalised as [batch * seq, embed] rows, for the reason ops._sequence_output gives.
        y = self.post_norm(jnp.swapaxes(z, 1, 2).reshape(batch * seq_len, heads * head_dim))
        y = y.reshape(batch, seq_len, heads * head_dim)
        if gate is not None:
            y = gelu(gate.reshape(batch, seq_len, -1)) * y
        y = self.o_proj(y.reshape(batch, seq_len, heads, head_dim))
        return constrain(y, ("batch", "seq", "embed"))


# Truncated normal of standard deviation 1/sqrt(K) for a depthwise kernel [K, heads, head_dim]: the
# default of the flax convolution in the reference code of Sun et al. 2024.
_conv_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
