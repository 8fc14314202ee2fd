"""Command lines: presets and overrides, their errors, ttt-eval and ttt-generate on a trained run."""

import json
import math

import numpy as np
import pytest

from tests.train.conftest import MICRO_MODEL
from ttt import configs
from ttt.models import generate
from ttt.train import checkpoint as checkpoint_lib
from ttt.train import cli
from ttt.train import mesh as mesh_lib
from ttt.train.tokenizers import ByteTokenizer


def test_preset_and_overrides_reach_the_config():
    config = cli.parse_train_args(["--config=hybrid-tiny", "--steps=7", "--model.hidden-size=64", "--data.seq_len=16",
                                   "--mesh.fsdp=2", "--evaluate=False", "--optimizer.learning-rate=1e-4"])
    assert config.config_name == "hybrid-tiny" and config.model.layer_pattern == "ttt_linear,swa"
    assert (config.steps, config.model.hidden_size, config.data.seq_len, config.mesh.fsdp) == (7, 64, 16, 2)
    assert config.evaluate is False and config.optimizer.learning_rate == 1e-4


def test_nested_attention_flags_reach_the_config():
    config = cli.parse_train_args(["--config=hybrid-tiny", "--model.attention.sliding-window=32",
                                   "--model.attention.num-kv-heads=2", "--model.attention.qk-norm=True"])
    assert config.model.attention == configs.AttentionConfig(num_kv_heads=2, sliding_window=32, qk_norm=True)
    assert config.model.kv_heads == 2


def test_nested_ttt_and_e2e_flags_reach_the_config():
    config = cli.parse_train_args(["--config=ttt-linear-tiny", "--model.ttt.mini-batch-size=8",
                                   "--model.ttt.backbone=transformer", "--model.ttt.inner-norm=False",
                                   "--model.ttt.learn-initial-weights=False", "--model.ttt.learn-inner-lr=False",
                                   "--model.ttt.learn-token-scale=False"])
    assert config.model.ttt == configs.TTTConfig(mini_batch_size=8, backbone="transformer", inner_norm=False,
                                                 learn_initial_weights=False, learn_inner_lr=False,
                                                 learn_token_scale=False)
    e2e = cli.parse_train_args(["--config=e2e-tiny", "--model.e2e.inner-lr=0.5", "--data.seq-len=64"]).model.e2e
    assert e2e == configs.E2EConfig(chunk_size=32, inner_lr=0.5)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model preset 'gpt-5'; expected one of"):
        cli.parse_train_args(["--config=gpt-5"])
    with pytest.raises(SystemExit, match="ttt-train: error: unknown model preset 'gpt-5'"):
        cli.train_main(["--config=gpt-5"])


def test_unknown_override_key_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_train_args(["--model.hidden-sise=64"])
    assert exit_info.value.code == 2
    assert "--model.hidden-sise" in capsys.readouterr().err


def test_eval_report_on_another_mesh_is_consistent_and_generate_matches_the_model(trained, tmp_path):
    # Trained 8-way data parallel; evaluated with parameters sharded 8-way (ttt-generate's default mesh).
    report = cli.run_eval(["--checkpoint", trained.config.workdir, "--max-length=32", "--batch-size=8",
                           "--mesh.data=1", "--mesh.fsdp=8", "--out", str(tmp_path)])
    with open(tmp_path / "report.json") as f:
        assert json.load(f)["loss"] == report["loss"]
    with open(tmp_path / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    bins = report["by_position"]
    assert [b["positions"] for b in bins] == [[1, 1], [2, 3], [4, 7], [8, 15], [16, 31]]
    weighted = sum(b["loss"] * b["tokens"] for b in bins) / sum(b["tokens"] for b in bins)
    np.testing.assert_allclose(weighted, report["loss"], rtol=1e-9)
    assert report["by_context_length"][-1] == {"context_length": 32, "loss": report["loss"],
                                               "bits_per_byte": report["bits_per_byte"]}
    np.testing.assert_allclose(report["bits_per_byte"], report["loss"] / math.log(2) / report["bytes_per_token"])
    assert report["unigram_entropy"]["bits_per_byte"] > 0 and len(report["samples"]) == 3

    text = cli.run_generate(["--checkpoint", trained.config.workdir, "--prompt", "def ", "--max-new-tokens=6",
                             "--temperature=0"])
    mesh = mesh_lib.make_mesh(cli.GenerateArgs.__dataclass_fields__["mesh"].default)
    with mesh_lib.activate(mesh):
        model, _ = checkpoint_lib.load_trained_model(trained.config.workdir, mesh)
        expected = generate(model, ByteTokenizer().encode("def ")[None], 6, temperature=0)
    assert model.config == MICRO_MODEL
    assert text == ByteTokenizer().decode(np.asarray(expected)[0, 4:])
