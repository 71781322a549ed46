"""Configuration: every preset composes, bad input fails naming the key, docs cover the CLI."""

from pathlib import Path

import pytest

from deepspec.flows.cli import STAGES, build_parser
from deepspec.models.errors import ConfigError
from deepspec.tasks.config import compose, config_hash

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ["target", "algo", "regen", "storage", "train", "eval"]


# what an option needs besides itself: storage base and s3 have no default url, openai no endpoint,
# file no answers file
NEEDS = {
    ("regen", "file"): ["regen.answers_file=answers.jsonl"],
    ("storage", "base"): ["storage.url=s3://bucket/x"],
    ("storage", "s3"): ["storage.url=s3://bucket/x"],
    ("regen", "openai"): ["regen.endpoints=[https://host/v1]"],
}


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = compose([f"{group}={option}", *NEEDS.get((group, option), [])])
        assert cfg[group] is not None


@pytest.mark.parametrize("pair", sorted(p.stem for p in (CONF / "target_algo").glob("*.yaml")))
def test_every_target_algo_pair_composes_with_its_values(pair):
    """`target_algo/<target>_<algo>.yaml` is picked by the pair alone and overrides the target's layers."""
    target, algo = pair.rsplit("_", 1)
    cfg = compose([f"target={target}", f"algo={algo}"])
    assert list(cfg.target.layer_ids) != list(compose([f"target={target}"]).target.layer_ids)
    if algo == "eagle3":
        assert len(cfg.target.layer_ids) == 3


def test_demo_preset_holds_deltas():
    demo, default = compose(config_name="demo"), compose()
    assert demo.run_dir == "runs/demo" and demo.train.precision == "fp32"
    assert default.run_dir == f"runs/{default.target.name}" and default.data_dir == f"{default.run_dir}/data"
    assert demo.target == default.target


def test_qwen3_4b_carries_upstream_recipe():
    cfg = compose(["target=qwen3_4b"])
    assert list(cfg.target.layer_ids) == [1, 9, 17, 25, 33]
    # 7 drafts a round as upstream's: 8 slots in the engines' DFlash convention (the anchor drafts nothing)
    assert (cfg.algo.block_size, cfg.algo.num_layers) == (8, 5)
    assert (cfg.train.lr, cfg.train.global_batch, cfg.train.epochs) == (6e-4, 512, 10)
    assert (cfg.train.warmup_ratio, cfg.train.weight_decay, cfg.train.grad_clip) == (0.04, 0.0, 1.0)
    assert list(cfg.train.betas) == [0.9, 0.999]  # torch's AdamW defaults, as upstream's optimizer
    assert cfg.algo.anchors_per_sequence == 512
    assert cfg.storage.max_length == 4096
    assert cfg.target.chat_template_kwargs.enable_thinking is False


def test_target_presets_carry_upstream_layers_and_mask_tokens():
    """deepseek-ai/DeepSpec `config/dflash/dflash_<target>.py`: target_layer_ids and mask_token_id."""
    upstream = {
        "qwen3_4b": ([1, 9, 17, 25, 33], 151669),
        "qwen3_8b": ([1, 9, 17, 25, 33], 151669),
        "qwen3_14b": ([1, 10, 19, 28, 37], 151669),
        "gemma4_12b": ([5, 17, 29, 41, 46], 4),
    }
    for target, (layers, mask) in upstream.items():
        cfg = compose([f"target={target}"])
        assert (list(cfg.target.layer_ids), cfg.target.mask_token_id) == (layers, mask), target


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        compose(["target=qwen9"])
    assert "target/qwen9" in str(err.value) and "qwen3_4b" in str(err.value)


def test_unknown_key_and_wrong_type_are_named():
    with pytest.raises(ConfigError, match=r"train\.epochz is not a setting of train; its keys: epochs, lr"):
        compose(["train.epochz=3"])
    with pytest.raises(ConfigError, match=r"train\.epochs: Value 'many'"):
        compose(["train.epochs=many"])
    # a key inside a setting that exists is not called unknown: Hydra's own advice stands
    with pytest.raises(ConfigError, match=r"use \+regen\.extra_body=\{top_k: 20\}"):
        compose(["regen.extra_body={top_k: 20}"])
    assert compose(["+regen.extra_body={top_k: 20}"]).regen.extra_body == {"top_k": 20}


def test_every_problem_is_reported_at_compose_time():
    """Checks that need neither data nor weights fail while composing, all listed at once."""
    bad = ["regen.api=grpc", "regen.batch_size=0", "storage.mode=lazy", "storage.task_runner=ray",
           "train.precision=fp16", "train.micro_batch=2", "train.global_batch=5", "prompts.max_samples=0",
           "target.layer_ids=[4,2]", "train.betas=[0.9]", "eval.serving.concurrency=[4,2]",
           "eval.serving.profile_tokens=[]", "eval.serving.profile_context=0",
           "eval.serving.steps=0"]  # fmt: skip
    with pytest.raises(ConfigError) as err:
        compose(bad)
    message = str(err.value)
    assert message.startswith("bad configuration, 13 problems:\n"), message
    for problem in [
        "regen.api='grpc': expected one of ['completions', 'chat']",
        "regen.batch_size=0: expected a positive count",
        "storage.mode='lazy': expected one of ['cached', 'online']",
        "storage.task_runner='ray': expected one of ['thread', 'dask']",
        "train.precision='fp16': expected one of ['bf16', 'fp32']",
        "train.global_batch=5 must be a multiple of train.micro_batch (2) x ranks (1:",
        "prompts.max_samples=0: expected a positive count or null",
        "target.layer_ids=[4, 2]: expected layer indices in increasing order, from 0",
        "train.betas=[0.9]: expected AdamW's two betas, each in [0, 1)",
        "eval.serving.concurrency=[4, 2]: expected counts of at least 1 in increasing order, or [] (off)",
        "eval.serving.profile_tokens=[]: expected counts of at least 1 in increasing order",
        "eval.serving.profile_context=0: expected at least 1",
        "eval.serving.steps=0: expected at least 1",
    ]:
        assert problem in message, problem
    assert list(compose(["eval.serving.concurrency=[]"]).eval.serving.concurrency) == []  # off, not a problem
    with pytest.raises(
        ConfigError, match=r"target\.layer_ids=\[0, 2\]: Eagle3 fuses exactly 3 target layers"
    ):
        compose(["target=stories260k", "algo=eagle3", "target.layer_ids=[0,2]"])


def test_regen_settings_left_null_are_filled_in():
    hf = compose(["target=stories260k"])
    assert (hf.regen.api, hf.regen.max_new_tokens, hf.regen.temperature) == ("completions", 128, 1.0)
    assert compose(["regen=vllm"]).regen.api == "completions"
    openai = compose(["regen=openai", "regen.endpoints=[https://host/v1]", "regen.temperature=0"])
    assert (openai.regen.api, openai.regen.temperature) == ("chat", 0)
    assert openai.regen.max_new_tokens == openai.target.max_new_tokens


def test_s3_storage_needs_a_url():
    with pytest.raises(ConfigError, match=r"storage\.url: no value \(set it, e\.g\. storage\.url=\.\.\.\)"):
        compose(["storage=s3"])


def test_config_hash_changes_with_values():
    a, b = compose(), compose(["train.lr=0.1"])
    assert config_hash(a.train) != config_hash(b.train)
    assert config_hash(a.target) == config_hash(b.target)


def test_readme_names_every_subcommand_and_group():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in [*STAGES, "pipeline", "retrain", "config"]:
        assert f"deepspec {name}" in readme, name
    for group in GROUPS:
        assert f"`{group}`" in readme, group


def test_cli_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in STAGES)
