"""`ttt-info`: parameter count and layer pattern of a model preset, from the abstract model only."""

import argparse
import math

from flax import nnx

from ttt import configs
from ttt.configs import ModelConfig
from ttt.models.lm import LM


def abstract_model(config: ModelConfig) -> LM:
    """The LM's structure, shapes and logical axis names (`nnx.eval_shape`), without computing or placing
    any array."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0)))


def count_parameters(config: ModelConfig) -> int:
    """Number of trainable parameters (`nnx.Param` entries) of the model built from `config`."""
    params = nnx.state(abstract_model(config), nnx.Param)
    return sum(math.prod(variable.shape) for _, variable in nnx.to_flat_state(params))


def describe(name: str) -> str:
    """A few lines: the preset's shape, layer pattern and parameter count."""
    config = configs.get(name)
    count = count_parameters(config)
    lines = [
        f"preset:          {name}",
        f"parameters:      {count:,} ({count / 1e6:.1f}M)",
        "layers:          " + " + ".join(f"{stage.repeats} x ({stage.layer_pattern}{' + prime MLP' * stage.prime_mlp})"
                                             for stage in config.model_stages)
        + f" = {config.num_layers}, scanned per stage",
        f"hidden / heads:  {config.hidden_size} / {config.num_heads} (kv heads {config.kv_heads}, head dim "
        f"{config.head_dim}), mlp {config.mlp_hidden_size}",
        f"vocab:           {config.vocab_size} ({'tied' if config.tie_embeddings else 'untied'} embeddings)",
    ]
    if any(mixer.startswith("ttt") for mixer in config.mixers):
        lines.append(f"ttt:             {config.ttt.backbone} backbone, mini-batch {config.ttt.mini_batch_size}")
    if "swa" in config.mixers:
        lines.append(f"sliding window:  {config.attention.sliding_window}")
    if config.e2e is not None:
        lines.append(f"ttt-e2e:         chunk {config.e2e.chunk_size}, inner SGD lr {config.e2e.inner_lr} clipped at "
                     f"global norm {config.e2e.inner_clip}, fast weights /{config.e2e.fast_params}/")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ttt-info", description=__doc__)
    parser.add_argument("--config", help="preset name (see --list)")
    parser.add_argument("--list", action="store_true", help="list every preset with its parameter count")
    args = parser.parse_args(argv)
    if args.list:
        for name in configs.names():
            print(f"{name:42s} {count_parameters(configs.get(name)):>15,}")
        return
    if args.config is None:
        parser.error("give --config NAME or --list")
    try:
        print(describe(args.config))
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
