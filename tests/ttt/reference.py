"""A naive float64 numpy TTT, written straight from docs/MATH.md (independent of ttt/).

Per head and token t (mini-batch n, position i inside it, 1-based):
  theta_t = theta_n - s_i * sum_{j=1..i} eta_j * grad l(theta_n; k_j, v_j)
  z_t = q_t + LN(g(q_t; theta_t)),   theta_{n+1} = theta at the last token of mini-batch n.
Gradients are derived by hand here (and checked against finite differences in the tests).
"""

import math

import numpy as np

EPS = 1e-6


def layer_norm(z, w, b):
    if w is None:
        return z
    mu = z.mean()
    sigma = math.sqrt(((z - mu) ** 2).mean() + EPS)
    return (z - mu) / sigma * w + b


def layer_norm_backward(z, grad_y, w):
    """Gradient of a scalar through y = LN(z), given dL/dy."""
    if w is None:
        return grad_y
    d = z.shape[0]
    mu = z.mean()
    sigma = math.sqrt(((z - mu) ** 2).mean() + EPS)
    xhat = (z - mu) / sigma
    gx = grad_y * w
    # Jacobian of xhat wrt z: (I - 1/d - xhat xhat^T / d) / sigma.
    jac = (np.eye(d) - 1.0 / d - np.outer(xhat, xhat) / d) / sigma
    return jac.T @ gx


def gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_derivative(x):
    c = math.sqrt(2 / math.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * c * (1 + 3 * 0.044715 * x**2)


def apply(kind, theta, x):
    if kind == "linear":
        return x @ theta["W"] + theta["b"]
    return gelu(x @ theta["W1"] + theta["b1"]) @ theta["W2"] + theta["b2"]


def loss(kind, theta, k, v, w, b):
    e = layer_norm(apply(kind, theta, k), w, b) - (v - k)
    return 0.5 * float(e @ e)


def grad(kind, theta, k, v, w, b):
    """Hand-derived gradient of `loss` with respect to every leaf of theta."""
    if kind == "linear":
        z = k @ theta["W"] + theta["b"]
        gz = layer_norm_backward(z, layer_norm(z, w, b) - (v - k), w)
        return {"W": np.outer(k, gz), "b": gz}
    z1 = k @ theta["W1"] + theta["b1"]
    x2 = gelu(z1)
    z2 = x2 @ theta["W2"] + theta["b2"]
    gz2 = layer_norm_backward(z2, layer_norm(z2, w, b) - (v - k), w)
    gz1 = (theta["W2"] @ gz2) * gelu_derivative(z1)
    return {"W1": np.outer(k, gz1), "b1": gz1, "W2": np.outer(x2, gz2), "b2": gz2}


def ttt(kind, q, k, v, eta, params, ln_weight, ln_bias, mini_batch_size, token_scale=None):
    """Returns (z [B, H, T, d], final params [B, H, ...]) in float64."""
    q, k, v, eta = (np.asarray(x, np.float64) for x in (q, k, v, eta))
    params = {n: np.asarray(p, np.float64) for n, p in params.items()}
    batch, heads, seq_len, _ = q.shape
    b = mini_batch_size
    s = 1.0 / np.arange(1, b + 1) if token_scale is None else np.asarray(token_scale, np.float64)
    z = np.zeros_like(q)
    final = {n: np.zeros_like(p) for n, p in params.items()}
    for bi in range(batch):
        for h in range(heads):
            w = None if ln_weight is None else np.asarray(ln_weight[h], np.float64)
            lb = None if ln_bias is None else np.asarray(ln_bias[h], np.float64)
            theta_n = {n: p[bi, h] for n, p in params.items()}
            for t in range(seq_len):
                n, i = divmod(t, b)  # i is 0-based: the paper's i is i + 1
                step = {name: np.zeros_like(p) for name, p in theta_n.items()}
                for j in range(n * b, t + 1):
                    g = grad(kind, theta_n, k[bi, h, j], v[bi, h, j], w, lb)
                    for name in step:
                        step[name] += eta[bi, h, j] * g[name]
                theta_t = {name: theta_n[name] - s[i] * step[name] for name in theta_n}
                z[bi, h, t] = q[bi, h, t] + layer_norm(apply(kind, theta_t, q[bi, h, t]), w, lb)
                if i == b - 1:
                    theta_n = theta_t
            for name in final:
                final[name][bi, h] = theta_t[name]
    return z, final
