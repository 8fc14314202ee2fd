"""`ttt-convert`: a ttt-lm-jax checkpoint (Sun et al. 2024's code) -> a params-only export of this project.

The reference's train script writes its parameters as a msgpack stream of `(key path, array)`
records (`streaming_params`, or `streaming_train_state` whose parameters sit under
`params/params/` beside the optimizer state). Its model config lives in a pickle beside them,
which is never opened here: the config is given as the JSON of the reference's own config dict
(the `CONFIGS` entry of its `ttt/models/model.py` with the run's `update_model_config` applied).

Every parameter is mapped by an explicit rule (reference name and shape -> this project's name and
shape); a parameter that is missing, left over or of another shape stops the conversion with its
name. Loading decodes msgpack only (flax's array encoding), never pickle, so no code from the file runs.

RoPE pairing. The reference rotates interleaved feature pairs (2i, 2i+1) of every head; this
project rotates (i, i + head_dim/2) unless the model is configured with `rope_pairing="interleaved"`.
`rope_pairing="half"` (the default) reorders the head features of every parameter that touches
them so that the reference's pair i becomes this project's pair i: attention scores are invariant
to a permutation applied to both queries and keys, and a TTT layer is equivariant to one applied
to all of q, k, v, its fast weights, its norms, its gate and its output projection, so the
converted model computes the reference's function with this project's own RoPE.
`rope_pairing="interleaved"` copies the features as they are and sets the config switch.
"""

import argparse
import dataclasses
import json
import os
from typing import Callable, Literal

import msgpack
import numpy as np
from flax import nnx
from flax.serialization import msgpack_restore

from ttt.configs import ModelConfig, TTTConfig
from ttt.configs.train import TrainConfig

RopePairing = Literal["half", "interleaved"]
# Where the reference's blocks land: one stage whose one-mixer pattern repeats num_layers times, so
# every block parameter is stacked along a leading axis of size num_layers.
BLOCK_TARGET = "stages/0/blocks/0"
TRAIN_STATE_PREFIX = "params/params/"
SEQ_MODELING_BLOCKS = {  # reference seq_modeling_block -> (mixer, TTT backbone)
    "self_attention": ("attention", None),
    "ttt_linear": ("ttt_linear", "mamba"),
    "ttt_mlp": ("ttt_mlp", "mamba"),
    "ttt_linear_base": ("ttt_linear", "transformer"),
    "ttt_mlp_base": ("ttt_mlp", "transformer"),
}


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes the rules' shapes are written in."""

    vocab: int
    hidden: int
    heads: int
    mlp_hidden: int
    mini_batch: int
    conv_width: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclasses.dataclass(frozen=True)
class Rule:
    """One reference parameter -> one parameter of this project.

    `convert` maps the reference array to the target layout (default: a reshape to the target
    shape); `head_feature_axes` are the target axes indexed by a head's features, reordered when
    the RoPE pairing is converted to "half".
    """

    source: str
    target: str
    source_shape: Callable[[Dims], tuple[int, ...]]
    target_shape: Callable[[Dims], tuple[int, ...]]
    head_feature_axes: tuple[int, ...] = ()
    convert: Callable[[np.ndarray, Dims], np.ndarray] | None = None


def _square(d: Dims):
    return (d.hidden, d.hidden)


def _vector(d: Dims):
    return (d.hidden,)


def _in_heads(d: Dims):
    return (d.hidden, d.heads, d.head_dim)


def _out_heads(d: Dims):
    return (d.heads, d.head_dim, d.hidden)


def _head_vector(d: Dims):
    return (d.heads, d.head_dim)


def _conv_kernel(d: Dims):
    return (d.conv_width, 1, d.hidden)


def _rule(source, target, source_shape, target_shape, head_feature_axes=(), convert=None):
    return Rule(source, target, source_shape, target_shape, head_feature_axes, convert)


BLOCK_RULES = [
    _rule("seq_norm/kernel", "mixer_norm/scale", _vector, _vector),
    _rule("ffn_norm/kernel", "mlp_norm/scale", _vector, _vector),
    _rule("feed_forward/w1/kernel", "mlp/gate/kernel", lambda d: (d.hidden, d.mlp_hidden),
          lambda d: (d.hidden, d.mlp_hidden)),
    _rule("feed_forward/w3/kernel", "mlp/up/kernel", lambda d: (d.hidden, d.mlp_hidden),
          lambda d: (d.hidden, d.mlp_hidden)),
    _rule("feed_forward/w2/kernel", "mlp/down/kernel", lambda d: (d.mlp_hidden, d.hidden),
          lambda d: (d.mlp_hidden, d.hidden)),
]
PRE_CONV_RULES = [
    _rule("conv/conv_norm/kernel", "pre_conv/norm/scale", _vector, _vector),
    _rule("conv/conv1/kernel", "pre_conv/weight", _conv_kernel, lambda d: (d.conv_width, d.hidden)),
    _rule("conv/conv1/bias", "pre_conv/bias", _vector, _vector),
]
ATTENTION_RULES = [  # RoPE touches only queries and keys; scores are invariant to reordering both.
    _rule("seq_modeling_block/wq/kernel", "mixer/query/kernel", _square, _in_heads, (2,)),
    _rule("seq_modeling_block/wk/kernel", "mixer/key/kernel", _square, _in_heads, (2,)),
    _rule("seq_modeling_block/wv/kernel", "mixer/value/kernel", _square, _in_heads),
    _rule("seq_modeling_block/wo/kernel", "mixer/out/kernel", _square, _out_heads),
]
TTT_RULES = [
    _rule("seq_modeling_block/wv/kernel", "mixer/v_proj/kernel", _square, _in_heads, (2,)),
    _rule("seq_modeling_block/wo/kernel", "mixer/o_proj/kernel", _square, _out_heads, (1,)),
    _rule("seq_modeling_block/learnable_ttt_lr/kernel", "mixer/lr_weight", lambda d: (d.heads, d.hidden, 1),
          lambda d: (d.hidden, d.heads), convert=lambda a, d: a[:, :, 0].T),
    _rule("seq_modeling_block/learnable_ttt_lr/bias", "mixer/lr_bias", lambda d: (d.heads, 1), lambda d: (d.heads,)),
    _rule("seq_modeling_block/learnable_token_idx", "mixer/token_scale_offset", lambda d: (d.mini_batch,),
          lambda d: (d.mini_batch,)),
    _rule("seq_modeling_block/ttt_norm/scale", "mixer/inner_ln_weight", _head_vector, _head_vector, (1,)),
    _rule("seq_modeling_block/ttt_norm/bias", "mixer/inner_ln_bias", _head_vector, _head_vector, (1,)),
    _rule("seq_modeling_block/post_norm/scale", "mixer/post_norm/scale", _vector, _vector, (0,)),
    _rule("seq_modeling_block/post_norm/bias", "mixer/post_norm/bias", _vector, _vector, (0,)),
]
MAMBA_RULES = [  # shared q/k projection, a causal depthwise conv each for q and k, GELU output gate
    _rule("seq_modeling_block/wq/kernel", "mixer/qk_proj/kernel", _square, _in_heads, (2,)),
    _rule("seq_modeling_block/conv_q/kernel", "mixer/conv_q_weight", _conv_kernel,
          lambda d: (d.conv_width, d.heads, d.head_dim), (2,)),
    _rule("seq_modeling_block/conv_q/bias", "mixer/conv_q_bias", _vector, _head_vector, (1,)),
    _rule("seq_modeling_block/conv_k/kernel", "mixer/conv_k_weight", _conv_kernel,
          lambda d: (d.conv_width, d.heads, d.head_dim), (2,)),
    _rule("seq_modeling_block/conv_k/bias", "mixer/conv_k_bias", _vector, _head_vector, (1,)),
    _rule("seq_modeling_block/wg/kernel", "mixer/gate_proj/kernel", _square, _in_heads, (2,)),
]
TRANSFORMER_BACKBONE_RULES = [
    _rule("seq_modeling_block/wq/kernel", "mixer/q_proj/kernel", _square, _in_heads, (2,)),
    _rule("seq_modeling_block/wk/kernel", "mixer/k_proj/kernel", _square, _in_heads, (2,)),
]
LINEAR_INNER_RULES = [
    _rule("seq_modeling_block/ttt_dense_0", "mixer/fast_weights/W", lambda d: (d.heads, d.head_dim, d.head_dim),
          lambda d: (d.heads, d.head_dim, d.head_dim), (1, 2)),
    _rule("seq_modeling_block/ttt_bias_0", "mixer/fast_weights/b", lambda d: (d.heads, 1, d.head_dim),
          _head_vector, (1,)),
]
MLP_INNER_RULES = [  # the 4 * head_dim hidden units of the inner MLP are not head features
    _rule("seq_modeling_block/ttt_dense_0", "mixer/fast_weights/W1", lambda d: (d.heads, d.head_dim, 4 * d.head_dim),
          lambda d: (d.heads, d.head_dim, 4 * d.head_dim), (1,)),
    _rule("seq_modeling_block/ttt_bias_0", "mixer/fast_weights/b1", lambda d: (d.heads, 1, 4 * d.head_dim),
          lambda d: (d.heads, 4 * d.head_dim)),
    _rule("seq_modeling_block/ttt_dense_1", "mixer/fast_weights/W2", lambda d: (d.heads, 4 * d.head_dim, d.head_dim),
          lambda d: (d.heads, 4 * d.head_dim, d.head_dim), (2,)),
    _rule("seq_modeling_block/ttt_bias_1", "mixer/fast_weights/b2", lambda d: (d.heads, 1, d.head_dim),
          _head_vector, (1,)),
]
MODEL_RULES = [
    _rule("model/wte/embedding", "embed/embedding", lambda d: (d.vocab, d.hidden), lambda d: (d.vocab, d.hidden)),
    _rule("model/ln_f/kernel", "final_norm/scale", _vector, _vector),
]
UNTIED_HEAD_RULE = _rule("lm_head/kernel", "head/kernel", lambda d: (d.hidden, d.vocab), lambda d: (d.hidden, d.vocab))


def _required(reference: dict, name: str):
    if name not in reference:
        raise ValueError(f"the reference config has no {name!r}; expected the keys of ttt-lm-jax's CONFIGS entries")
    return reference[name]


def model_config(reference: dict, rope_pairing: RopePairing = "half") -> ModelConfig:
    """This project's ModelConfig for a reference config dict (ttt-lm-jax `ModelConfig.to_dict()` keys)."""
    block = _required(reference, "seq_modeling_block")
    if block not in SEQ_MODELING_BLOCKS:
        raise ValueError(f"seq_modeling_block={block!r} is not convertible; "
                         f"expected one of {tuple(SEQ_MODELING_BLOCKS)}")
    mixer, backbone = SEQ_MODELING_BLOCKS[block]
    fields = dict(
        vocab_size=_required(reference, "vocab_size"),
        hidden_size=_required(reference, "hidden_size"),
        num_layers=_required(reference, "num_hidden_layers"),
        num_heads=_required(reference, "num_attention_heads"),
        mlp_hidden_size=_required(reference, "intermediate_size"),
        layer_pattern=mixer,
        max_seq_len=reference.get("max_sequence_length", 2048),
        # The reference's ModelConfig defaults to untied embeddings; its CONFIGS entries tie them.
        tie_embeddings=reference.get("tie_word_embeddings", False),
        rope_theta=reference.get("rope_theta", 10000.0),
        norm_eps=reference.get("rms_norm_eps", 1e-6),
        init_std=reference.get("initializer_range", 0.02),
    )
    ttt = {}
    if backbone is not None:
        base_lr = _required(reference, "ttt_base_lr")
        ttt.update(backbone=backbone, mini_batch_size=_required(reference, "mini_batch_size"),
                   remat_group_size=reference.get("remat_mini_batch_group_size", 4),
                   linear_base_lr=base_lr, mlp_base_lr=base_lr)
    # Switches beyond this project's defaults are set only when on, so a reference model that needs
    # none of them converts to any version of ModelConfig.
    if reference.get("pre_conv", False):
        fields.update(pre_conv=True)
    if reference.get("pre_conv", False) or backbone == "mamba":
        ttt.update(conv_kernel=_required(reference, "conv_width"))
    if rope_pairing == "interleaved":
        fields.update(rope_pairing="interleaved")
    elif rope_pairing != "half":
        raise ValueError(f"rope_pairing={rope_pairing!r}; expected 'half' or 'interleaved'")
    return ModelConfig(**fields, ttt=TTTConfig(**ttt))


def _dims(reference: dict) -> Dims:
    mini_batch = reference.get("mini_batch_size", 0)
    return Dims(vocab=reference["vocab_size"], hidden=reference["hidden_size"], heads=reference["num_attention_heads"],
                mlp_hidden=reference["intermediate_size"], mini_batch=mini_batch,
                conv_width=reference.get("conv_width", 0))


def block_rules(reference: dict) -> list[Rule]:
    """The rules of one reference block (`model/h/<i>/...`) for this reference config."""
    mixer, backbone = SEQ_MODELING_BLOCKS[_required(reference, "seq_modeling_block")]
    rules = list(BLOCK_RULES)
    if reference.get("pre_conv", False):
        rules += PRE_CONV_RULES
    if backbone is None:
        return rules + ATTENTION_RULES
    rules += TTT_RULES + (MAMBA_RULES if backbone == "mamba" else TRANSFORMER_BACKBONE_RULES)
    return rules + (LINEAR_INNER_RULES if mixer == "ttt_linear" else MLP_INNER_RULES)


def expected_tree(reference: dict) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(reference name -> shape, target name -> shape) of every parameter the rules cover."""
    dims, layers = _dims(reference), reference["num_hidden_layers"]
    source, target = {}, {}
    model_rules = MODEL_RULES + ([] if reference.get("tie_word_embeddings", False) else [UNTIED_HEAD_RULE])
    for rule in model_rules:
        source[rule.source] = rule.source_shape(dims)
        target[rule.target] = rule.target_shape(dims)
    for rule in block_rules(reference):
        for layer in range(layers):
            source[f"model/h/{layer}/{rule.source}"] = rule.source_shape(dims)
        target[f"{BLOCK_TARGET}/{rule.target}"] = (layers, *rule.target_shape(dims))
    return source, target


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """The parameters of a reference streaming checkpoint: {"model/wte/embedding": array, ...}.

    Accepts `streaming_params` and `streaming_train_state` files (only the parameters of the
    latter are kept). Each record is decoded with msgpack and flax's array encoding only.
    """
    params = {}
    with open(path, "rb") as f:
        for record in msgpack.Unpacker(f, raw=False, max_buffer_size=0):
            if not (isinstance(record, (list, tuple)) and len(record) == 2 and isinstance(record[1], bytes)):
                raise ValueError(f"{path} is not a ttt-lm-jax streaming checkpoint: found a record of type "
                                 f"{type(record).__name__}; expected (key path, serialized array) pairs")
            name = "/".join(str(part) for part in record[0])
            if name.startswith(TRAIN_STATE_PREFIX):
                name = name[len(TRAIN_STATE_PREFIX):]
            elif name.startswith(("opt_state/", "step")):
                continue
            params[name] = np.asarray(msgpack_restore(record[1]))
    if not params:
        raise ValueError(f"{path} holds no parameters")
    return params


def _reorder_head_features(array: np.ndarray, axes: tuple[int, ...], target_shape: tuple[int, ...],
                           dims: Dims) -> np.ndarray:
    """Move each head's interleaved pair (2i, 2i+1) to features (i, i + head_dim/2)."""
    order = np.concatenate([np.arange(0, dims.head_dim, 2), np.arange(1, dims.head_dim, 2)])
    for axis in axes:
        if target_shape[axis] == dims.head_dim:
            array = np.take(array, order, axis=axis)
        else:  # a [hidden] axis: heads of head_dim features each
            array = np.take(array, (np.arange(dims.heads)[:, None] * dims.head_dim + order).reshape(-1), axis=axis)
    return array


def _convert_one(rule: Rule, name: str, array: np.ndarray, dims: Dims, rope_pairing: RopePairing) -> np.ndarray:
    if array.shape != rule.source_shape(dims):
        raise ValueError(f"reference parameter {name} has shape {array.shape}; expected {rule.source_shape(dims)} "
                         f"for the given config (mapped to {rule.target})")
    target_shape = rule.target_shape(dims)
    converted = rule.convert(array, dims) if rule.convert else array.reshape(target_shape)
    if rope_pairing == "half":
        converted = _reorder_head_features(converted, rule.head_feature_axes, target_shape, dims)
    return np.asarray(converted, np.float32)


def convert_params(params: dict[str, np.ndarray], reference: dict,
                   rope_pairing: RopePairing = "half") -> tuple[dict[str, np.ndarray], list[str]]:
    """Reference parameters -> ({target name: float32 array}, report lines, one per target parameter).

    Raises ValueError naming the first reference parameter that is missing, left over or of the
    wrong shape.
    """
    dims, layers = _dims(reference), reference["num_hidden_layers"]
    source_shapes, _ = expected_tree(reference)
    missing = [name for name in source_shapes if name not in params]
    if missing:
        raise ValueError(f"reference parameter {missing[0]} (shape {source_shapes[missing[0]]}) is missing from the "
                         f"checkpoint ({len(missing)} missing in all); is the reference config the one it was "
                         "trained with?")
    unexpected = [name for name in params if name not in source_shapes]
    if unexpected:
        raise ValueError(f"reference parameter {unexpected[0]} (shape {params[unexpected[0]].shape}) has no rule for "
                         f"seq_modeling_block={reference['seq_modeling_block']!r}, pre_conv="
                         f"{reference.get('pre_conv', False)}, tie_word_embeddings="
                         f"{reference.get('tie_word_embeddings', False)}")
    converted, report = {}, []
    model_rules = MODEL_RULES + ([] if reference.get("tie_word_embeddings", False) else [UNTIED_HEAD_RULE])
    for rule in model_rules:
        converted[rule.target] = _convert_one(rule, rule.source, params[rule.source], dims, rope_pairing)
        report.append(f"{rule.source} {tuple(params[rule.source].shape)} -> {rule.target} "
                      f"{converted[rule.target].shape}")
    for rule in block_rules(reference):
        names = [f"model/h/{layer}/{rule.source}" for layer in range(layers)]
        target = f"{BLOCK_TARGET}/{rule.target}"
        converted[target] = np.stack([_convert_one(rule, n, params[n], dims, rope_pairing) for n in names])
        reordered = " (head features reordered)" if rope_pairing == "half" and rule.head_feature_axes else ""
        report.append(f"model/h/{{0..{layers - 1}}}/{rule.source} {tuple(params[names[0]].shape)} -> {target} "
                      f"{converted[target].shape}{reordered}")
    return converted, report


def load_into(model, converted: dict[str, np.ndarray]) -> None:
    """Set every nnx.Param of `model` from `converted` (names as `convert_params` gives them).

    Raises ValueError naming the first model parameter without a value, of another shape, or the
    first converted value the model has no parameter for.
    """
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    names = {"/".join(str(part) for part in path): path for path in flat}
    for name in names:
        if name not in converted:
            raise ValueError(f"model parameter {name} has no converted value; the converted names are "
                             f"{sorted(converted)}")
    for name, value in converted.items():
        if name not in names:
            raise ValueError(f"converted parameter {name} has no counterpart in the model; its parameters are "
                             f"{sorted(names)}")
        variable = flat[names[name]]
        if tuple(variable.shape) != value.shape:
            raise ValueError(f"converted parameter {name} has shape {value.shape}; the model expects "
                             f"{tuple(variable.shape)}")
        variable.set_value(value.astype(variable.dtype))
    nnx.update(model, nnx.from_flat_state(flat))


def convert(checkpoint: str, reference: dict, directory: str, rope_pairing: RopePairing = "half") -> list[str]:
    """Convert the checkpoint file and write a params-only export to `directory`; returns the report."""
    from ttt.train.checkpoint import export_params
    from ttt.train.step import abstract_model

    config = model_config(reference, rope_pairing)
    converted, report = convert_params(read_checkpoint(checkpoint), reference, rope_pairing)
    model = abstract_model(config)
    load_into(model, converted)
    name = f"ttt-lm-jax:{reference['seq_modeling_block']}"
    export_params(model, TrainConfig(model=config, config_name=name), directory)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ttt-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a ttt-lm-jax streaming_params or streaming_train_state file")
    parser.add_argument("output", help="folder of the params-only export (for ttt-eval and ttt-generate)")
    parser.add_argument("--reference-config", required=True,
                        help="JSON file of the reference's model config dict (its CONFIGS entry with the run's "
                             "update_model_config applied)")
    parser.add_argument("--rope-pairing", choices=("half", "interleaved"), default="half",
                        help="half: reorder head features for this project's RoPE; interleaved: keep the "
                             "reference's order and set the model's rope_pairing switch")
    args = parser.parse_args(argv)
    with open(args.reference_config) as f:
        reference = json.load(f)
    report = convert(args.checkpoint, reference, args.output, args.rope_pairing)
    print("\n".join(report))
    print(f"converted {len(report)} parameters -> {os.path.abspath(args.output)}")
