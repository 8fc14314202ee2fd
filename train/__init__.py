"""Everything around a model: mesh and sharding rules, data, the training loop, checkpoints, evaluation, CLI.

- `ttt.train.mesh`: `MeshConfig` -> mesh; `LOGICAL_AXIS_RULES`, the one logical-to-mesh table.
- `ttt.train.sources`, `dataset`, `pipeline`, `tokenizers`: text -> ArrayRecord (TFDS) -> grain batches.
- `ttt.train.optim`, `step`, `loop`, `metrics`: the optimizer, the compiled steps, `train(config)`.
- `ttt.train.checkpoint`: orbax checkpoints, params-only export, loading onto any mesh.
- `ttt.train.evaluate`: loss by position and by context length, plots, samples.
- `ttt.train.cli`: `ttt-train`, `ttt-eval`, `ttt-generate`.
"""
