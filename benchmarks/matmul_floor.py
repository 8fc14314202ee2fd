"""The matrix products of a TTT layer's forward alone: a floor under the layer's forward time.

`layer_products(inner, seq)` builds a program with the matrix products of `ttt.TTTLayer`'s forward
(mamba backbone, dual form, batch 1) and little else: the q/k, v, gate, inner-LR and output
projections, and, in a scan over mini-batches grouped and unrolled as the layer's scan is, the dual
form's products of each mini-batch with the fast weights and the [b, b] attention (ttt/dual.py),
spelled as the layer spells them. Left out: the convolutions, RoPE, the inner LayerNorm and its
gradient, GELU, the learning-rate gate, the biases and their updates, the output norm and gate. Kept
besides the products: the fast weights' subtractions, which chain each mini-batch's products to the
last one's (so that XLA can neither drop nor reorder them), and the in-step transposes that feed them.

Timed beside another layer in one process (benchmarks/reference_speed.py), other layer / products
alone bounds the speed-up over it that an implementation of the dual form reaches while its products
run at the speed this machine's XLA runs them.

The inputs are small enough that the fast weights stay finite over long sequences (non-finite values
would time other code paths).
"""


def layer_products(inner: str, seq: int, hidden: int, heads: int, mini_batch: int, group: int):
    """(jitted products-alone forward, its arguments) for `inner` ("linear" or "mlp") at `seq` tokens, with
    the layer's hidden size, heads, mini-batch size and remat group size.

    `seq` must be a multiple of mini_batch * group; the forward maps x [1, seq, hidden] to [1, seq, hidden].
    """
    import jax
    import jax.numpy as jnp

    from ttt.inner_models import LINEAR, MLP

    if seq % (mini_batch * group):
        raise ValueError(f"seq {seq}: expected a multiple of mini_batch * group = {mini_batch * group}")
    head_dim, num = hidden // heads, seq // mini_batch
    transpose = lambda a: jnp.swapaxes(a, -1, -2)
    keys = iter(jax.random.split(jax.random.key(0), 10))
    normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape)

    def linear_step(w, xs):
        k, q = xs  # [heads, b, head_dim] each
        z = jnp.concatenate([k, q], axis=-2) @ w["W"]
        grad = z[:, :mini_batch]  # stands for the inner loss's gradient (elementwise, left out)
        out = z[:, mini_batch:] - (q @ transpose(k)) @ grad
        return {"W": w["W"] - transpose(k) @ grad}, out

    def mlp_step(w, xs):
        k, q = xs
        z1 = jnp.concatenate([k, q], axis=-2) @ w["W1"]
        hidden_k = z1[:, :mini_batch]  # GELU left out
        grad_z2 = hidden_k @ w["W2"]
        grad_z1 = jnp.einsum("...je,...he->...jh", grad_z2, w["W2"])
        hidden_q = z1[:, mini_batch:] - (q @ transpose(k)) @ grad_z1
        out = hidden_q @ w["W2"] - (hidden_q @ transpose(hidden_k)) @ grad_z2
        return {"W1": w["W1"] - transpose(k) @ grad_z1, "W2": w["W2"] - transpose(hidden_k) @ grad_z2}, out

    step = linear_step if inner == "linear" else mlp_step

    def forward(x, projections, fast_weights):
        tokens = x.reshape(seq, hidden)
        qk, v, gate = (tokens @ projections[name] for name in ("qk", "v", "gate"))
        inner_lr = tokens @ projections["inner_lr"]
        # Token-major mini-batches [num, b, heads, head_dim], moved heads-first inside each step, as the layer does.
        split = lambda a: a.reshape(num // group, group, mini_batch, heads, head_dim)
        heads_first = lambda body: lambda w, xs: body(w, tuple(jnp.swapaxes(a, 0, 1) for a in xs))
        run_group = lambda w, xs: jax.lax.scan(heads_first(step), w, xs, unroll=True)
        # Keys and queries: the layer convolves its q/k projection twice; any two projections have their shapes.
        _, out = jax.lax.scan(run_group, fast_weights, (split(qk), split(v)))
        z = jnp.swapaxes(out, -3, -2).reshape(seq, hidden)  # out: [num / group, group, heads, b, head_dim]
        return ((z + gate + inner_lr.sum()) @ projections["out"]).reshape(1, seq, hidden)

    scale = hidden ** -0.5
    projections = {name: normal((hidden, hidden), scale) for name in ("qk", "v", "gate", "out")}
    projections["inner_lr"] = normal((hidden, heads), scale)
    # The inner model's weight matrices (its biases left out), per head, scaled by their fan-in.
    shapes = (LINEAR if inner == "linear" else MLP).param_shapes(head_dim)
    fast_weights = {name: normal((heads, *shape), shape[0] ** -0.5) for name, shape in shapes.items()
                    if len(shape) == 2}
    x = normal((1, seq, hidden), 0.01)
    return jax.jit(forward), (x, projections, fast_weights)
