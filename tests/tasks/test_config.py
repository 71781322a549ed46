"""Configuration: every preset composes, bad input fails naming the key, docs cover the CLI."""

from pathlib import Path

import pytest

from deepspec.flows.cli import STAGES, build_parser
from deepspec.models.errors import ConfigError
from deepspec.tasks.config import compose, config_hash

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ["target", "algo", "regen", "storage", "train", "eval"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        extra = ["storage.url=s3://bucket/x"] if (group, option) == ("storage", "s3") else []
        cfg = compose([f"{group}={option}", *extra])
        assert cfg[group] is not None


def test_demo_preset_holds_deltas():
    demo, default = compose(config_name="demo"), compose()
    assert demo.run_dir == "runs/demo" and demo.train.precision == "fp32"
    assert demo.target == default.target


def test_qwen3_4b_carries_upstream_recipe():
    cfg = compose(["target=qwen3_4b"])
    assert list(cfg.target.layer_ids) == [1, 9, 17, 25, 33]
    assert (cfg.algo.block_size, cfg.algo.num_layers) == (7, 5)
    assert (cfg.train.lr, cfg.train.global_batch, cfg.train.epochs) == (6e-4, 512, 10)
    assert cfg.storage.max_length == 4096
    assert cfg.target.chat_template_kwargs.enable_thinking is False


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        compose(["target=qwen9"])
    assert "target/qwen9" in str(err.value) and "qwen3_4b" in str(err.value)


def test_unknown_key_and_wrong_type_are_named():
    with pytest.raises(ConfigError, match="train.epochz"):
        compose(["train.epochz=3"])
    with pytest.raises(ConfigError, match="epochs"):
        compose(["train.epochs=many"])


def test_s3_storage_needs_a_url():
    with pytest.raises(ConfigError, match="storage.url"):
        compose(["storage=s3"])


def test_config_hash_changes_with_values():
    a, b = compose(), compose(["train.lr=0.1"])
    assert config_hash(a.train) != config_hash(b.train)
    assert config_hash(a.target) == config_hash(b.target)


def test_readme_names_every_subcommand_and_group():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in [*STAGES, "pipeline", "config"]:
        assert f"deepspec {name}" in readme, name
    for group in GROUPS:
        assert f"`{group}`" in readme, group


def test_cli_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in STAGES)
