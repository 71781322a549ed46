"""`deepspec estimate-cache`: bytes per token against upstream's layout, token counts, the printed table,
and that the estimate matches the bytes a shard really takes."""

from __future__ import annotations

import pytest
import torch
from support import stories
from support.stories import write_answers

from deepspec.flows.cli import main
from deepspec.models.errors import ConfigError
from deepspec.tasks.cache.encoding import ENCODINGS
from deepspec.tasks.cache.estimate import SAMPLE_OVERHEAD_BYTES, SHARD_OVERHEAD_BYTES, count_tokens, estimate
from deepspec.tasks.cache.format import open_fs, shard_name, write_shard
from deepspec.tasks.config import compose

STORIES = stories.STORIES[:4]  # four rows, so that counting every other row samples rows 0 and 2


def conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def test_qwen3_4b_upstream_is_30726_bytes_a_token():
    result = estimate(compose(["target=qwen3_4b"]), tokens=1_000_000)
    assert (result["hidden_size"], result["num_hidden_layers"], result["feature_dim"]) == (2560, 36, 12_800)
    layouts = result["layouts"]
    assert layouts["upstream"]["bytes_per_token"] == 30_726 == 6 + 2 * 2560 * (5 + 1)
    assert layouts["upstream"]["total_bytes"] == 30_726 * 1_000_000
    per_token = {name: row["bytes_per_token"] for name, row in layouts.items()}
    assert per_token == {
        "upstream": 30_726,
        "bf16": 25_604.125,  # int32 id 4 + packed loss mask 1/8 + features
        "fp8": 12_808.125,
        "int8": 13_204.125,
        "int6": 10_004.125,
        "int4": 6_804.125,
        "int4_outliers": 7_204.125,
        "int4_rot": 6_804.125,
        "int4_mixed": 7_524.125,  # 4 layers of int4_rot, the teacher's layer int6_rot + 20 outliers
    }
    assert all(layouts[n]["ratio"] <= 0.25 for n in ("int4", "int4_outliers", "int4_rot", "int4_mixed"))
    assert layouts["int4_mixed"]["ratio"] == pytest.approx(0.2449, abs=1e-4)
    assert layouts["fp8"]["ratio"] == pytest.approx(0.417, abs=1e-3)
    assert layouts["int4"]["total_bytes"] == 6_804_125_000  # no samples given: no framing


def test_every_target_preset_estimates_but_an_unreachable_unpinned_one(tmp_path):
    for name in ("qwen3_8b", "qwen3_14b", "smollm2_135m", "stories260k"):
        result = estimate(compose([f"target={name}"]))
        assert result["layouts"]["int4"]["ratio"] < 0.25 and result["tokens"] is None, name
        assert result["layouts"]["int4_mixed"]["ratio"] < 0.25, name
    assert (
        estimate(compose(["target=qwen3_14b"]))["layouts"]["upstream"]["bytes_per_token"] == 6 + 2 * 5120 * 6
    )
    missing = tmp_path / "no" / "such" / "model"  # not a hub id either: fails without a network call
    with pytest.raises(ConfigError, match="set target.hidden_size"):
        estimate(compose(["target=gemma4_12b", f"target.path={missing}"]))
    assert estimate(compose(["target=gemma4_12b", "target.hidden_size=3840"]))["feature_dim"] == 5 * 3840


def test_hidden_size_read_from_the_checkpoint_config(assets_dir):
    unpinned = [f"target.path={assets_dir}/models/stories260k", "target.hidden_size=null",
                "target.num_hidden_layers=null"]  # fmt: skip
    result = estimate(compose(["target=stories260k", *unpinned]))
    assert (result["hidden_size"], result["num_hidden_layers"], result["feature_dim"]) == (64, 5, 192)
    # the layer count is unknown while composing: layers beyond the checkpoint's fail here
    beyond = compose(["target=stories260k", *unpinned, "target.layer_ids=[0,2,5]"])
    with pytest.raises(ConfigError, match=r"target\.layer_ids=\[0, 2, 5\]: each must be in \[0, 4\]"):
        estimate(beyond)


def test_layer_ids_beyond_the_target_and_unknown_encodings_fail():
    """Refused while composing, when the preset pins the target's layer count."""
    with pytest.raises(
        ConfigError, match=r"target\.layer_ids=\[1, 36\]: the target has 36 layers \(0\.\.35\)"
    ):
        compose(["target=qwen3_4b", "target.layer_ids=[1,36]"])
    with pytest.raises(ConfigError, match=r"storage\.encoding='int3': expected one of \['bf16', 'fp8'"):
        compose(["storage.encoding=int3"])


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_estimate_matches_the_bytes_shards_take(encoding, tmp_path):
    cfg = compose(["target=stories260k", f"storage.encoding={encoding}", "storage.samples_per_shard=3"])
    lengths = [7, 50, 300, 1, 4096]
    result = estimate(cfg, tokens=sum(lengths), samples=len(lengths))
    fs, root = open_fs(str(tmp_path))
    samples = [
        {
            "sample_id": f"row-{i}",
            "input_ids": list(range(n)),
            "loss_mask": [1] * n,
            "features": torch.randn(n, 192),
        }
        for i, n in enumerate(lengths)
    ]
    written = sum(
        write_shard(
            fs,
            root,
            shard_name(k),
            samples[3 * k : 3 * k + 3],
            encoding=encoding,
            layer_ids=cfg.target.layer_ids,
        )["bytes"]  # fmt: skip
        for k in range(2)
    )
    row = result["layouts"][encoding]
    framing = len(lengths) * SAMPLE_OVERHEAD_BYTES + 2 * SHARD_OVERHEAD_BYTES
    assert row["total_bytes"] == pytest.approx(sum(lengths) * row["bytes_per_token"] + framing, abs=1)
    assert written <= row["total_bytes"] <= written + 100 * len(lengths)


def test_tokens_counted_with_the_target_tokenizer(assets_dir, tmp_path):
    from deepspec.models.chat import render_conversation
    from deepspec.models.target import load_tokenizer

    path = assets_dir / "models" / "stories260k"
    tokenizer = load_tokenizer(str(path))
    for max_length in (4096, 9):  # 9 cuts some answers away entirely: such rows are not cached
        overrides = ["target=stories260k", f"target.path={path}", f"run_dir={tmp_path}",
                     f"storage.max_length={max_length}"]  # fmt: skip
        write_answers(overrides, STORIES)
        cfg = compose(overrides)
        counted = count_tokens(cfg)
        rendered = [
            render_conversation(tokenizer, conversation(p, a), use_chat_template=False, max_length=max_length)
            for p, a in STORIES
        ]
        kept = [len(r.input_ids) for r in rendered if any(r.loss_mask)]
        assert (counted["tokens"], counted["samples"]) == (sum(kept), len(kept)), max_length
        assert "rendered with the target tokenizer" in counted["how"]
    assert len(kept) < len(STORIES)
    sampled = count_tokens(cfg, max_rows=2)  # rows 0 and 2, scaled to the 4 rows
    assert "1 conversation in 2 of 4" in sampled["how"]
    chosen = [len(r.input_ids) for r in rendered[::2] if any(r.loss_mask)]
    assert (sampled["tokens"], sampled["samples"]) == (2 * sum(chosen), 2 * len(chosen))


def test_qwen3_tokens_counted_with_its_chat_template(assets_dir, tmp_path):
    from deepspec.models.chat import render_conversation
    from deepspec.models.target import load_tokenizer

    path = assets_dir / "tokenizers" / "qwen3"
    overrides = ["target=qwen3_4b", f"target.path={path}", f"run_dir={tmp_path}"]
    write_answers(overrides, STORIES)
    counted = count_tokens(compose(overrides))
    tokenizer = load_tokenizer(str(path))
    kwargs = {"enable_thinking": False}
    want = sum(
        len(
            render_conversation(
                tokenizer, conversation(p, a), use_chat_template=True, chat_template_kwargs=kwargs
            ).input_ids
        )
        for p, a in STORIES
    )
    assert (counted["tokens"], counted["samples"]) == (want, len(STORIES))
    assert want > sum(len(tokenizer(p + a).input_ids) for p, a in STORIES) + 10 * len(
        STORIES
    )  # template tokens


def test_tokens_estimated_from_characters_without_a_tokenizer(tmp_path):
    overrides = ["target=qwen3_4b", f"target.path={tmp_path / 'no' / 'such' / 'model'}",
                 f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    write_answers(overrides, STORIES)
    cfg = compose(overrides)
    counted = count_tokens(cfg)
    chars = [len(p) + len(a) for p, a in STORIES]
    assert counted["tokens"] == sum(-(-c // 4) for c in chars) and counted["samples"] == len(STORIES)
    assert "4 characters a token" in counted["how"]
    assert count_tokens(compose([f"run_dir={tmp_path / 'empty'}"])) is None


def test_cli_prints_the_table(capsys, tmp_path):
    assert main(["estimate-cache", "target=qwen3_4b", "storage.encoding=int4", "--tokens", "1.24e9"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "30,726" in lines["upstream"] and "1.000" in lines["upstream"] and "38.1 TB" in lines["upstream"]
    assert "6,804.125" in lines["int4"] and "0.221" in lines["int4"] and lines["int4"].endswith("*")
    assert all(name in lines for name in ENCODINGS)
    assert "tokens: 1,240,000,000 (--tokens)" in out

    no_tokenizer = f"target.path={tmp_path / 'no' / 'such' / 'model'}"
    overrides = ["target=qwen3_4b", no_tokenizer, f"run_dir={tmp_path}"]
    write_answers(overrides, STORIES)  # without --tokens, the run's answers are counted
    assert main(["estimate-cache", *overrides]) == 0
    assert "estimated at 4 characters a token" in capsys.readouterr().out

    assert main(["estimate-cache", "target=gemma4_12b", no_tokenizer]) == 2
    assert "set target.hidden_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["estimate-cache", "--tokens", "many"])
