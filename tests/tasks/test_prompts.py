"""The prompts stage: loading and checking sources (JSONL, JSON, Parquet, CSV, datasets), setting malformed
rows aside, dedup, the seeded held-out split, skipping on re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from deepspec.models.errors import ConfigError, DataError
from deepspec.tasks import tracking
from deepspec.tasks.config import compose
from deepspec.tasks.paths import run_paths
from deepspec.tasks.prompts import load_conversations, prepare_prompts
from deepspec.tasks.results import PromptsResult


def _write(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _user(text: str) -> dict:
    return {"conversations": [{"role": "user", "content": text}]}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def make_cfg(tmp_path, tracking_uri):
    """A config for a run in tmp_path; the built-in prompts unless `prompts.source` is given (the default,
    a hub dataset, is out of reach in tests)."""

    def make(*overrides: str, run: str = "run"):
        source = [] if any(o.startswith("prompts.source=") for o in overrides) else ["prompts.source=builtin"]
        return compose([f"run_dir={tmp_path / run}", f"tracking.uri={tracking_uri}", *source, *overrides])

    return make


def test_builtin_prompts_are_valid():
    rows = load_conversations("builtin")
    assert len(rows) == 48
    assert sorted({r["category"] for r in rows}) == ["chat", "code", "math"]
    for category in ("chat", "code", "math"):
        assert sum(r["category"] == category for r in rows) == 16
    assert len({r["id"] for r in rows}) == 48
    assert all(r["source"] == "builtin" and r["id"].startswith(f"builtin-{r['category']}-") for r in rows)
    assert all([t["role"] for t in r["conversations"]] == ["user"] for r in rows)
    assert len({r["conversations"][0]["content"] for r in rows}) == 48


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [_user("Hi"), '{"conversations": [', _user("Bye")])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_conversations(str(path))


def test_bad_role_names_file_line_and_field(tmp_path):
    bad = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}
    path = _write(tmp_path / "prompts.jsonl", [_user("a"), _user("b"), _user("c"), bad])
    with pytest.raises(DataError) as err:
        load_conversations(str(path))
    expected = "field 'conversations[1].role': expected one of user/assistant/system, got 'bot'"
    assert f"prompts.jsonl:4: {expected}" in str(err.value)


def test_no_user_turn_is_an_error(tmp_path):
    row = {
        "conversations": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi"}]
    }
    path = _write(tmp_path / "p.jsonl", [_user("fine"), row])
    with pytest.raises(
        DataError, match=r"p\.jsonl:2: field 'conversations': the conversation has no user turn"
    ):
        load_conversations(str(path))


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"id": 3}, "'conversations' (or 'messages')"),
        ({"conversations": []}, "'conversations' (or 'messages')"),
        ({"conversations": ["hi"]}, "'conversations[0]'"),
        ({"conversations": [{"role": "user", "content": 5}]}, "'conversations[0].content'"),
        ({"messages": [{"role": "user"}]}, "'messages[0].value'"),
        ({"conversations": [{"role": "user", "content": "x"}], "category": ["a"]}, "'category'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_missing_or_invalid_fields_are_named(tmp_path, row, field):
    path = _write(tmp_path / "p.jsonl", [_user("fine"), row])
    rejects: list[dict] = []
    rows = load_conversations(str(path), rejects=rejects)
    assert [r["conversations"][0]["content"] for r in rows] == ["fine"]
    assert len(rejects) == 1
    assert (rejects[0]["source"], rejects[0]["line"], rejects[0]["raw"]) == (str(path), 2, row)
    assert field in rejects[0]["reason"]
    with pytest.raises(DataError, match=r"p\.jsonl:2: ") as err:  # without a rejects list: an error
        load_conversations(str(path))
    assert field in str(err.value)


def test_all_bad_rows_are_listed_at_once(tmp_path):
    path = _write(
        tmp_path / "p.jsonl", ["nope", _user("ok"), {"conversations": [{"role": "x", "content": "y"}]}]
    )
    with pytest.raises(DataError) as err:
        load_conversations(str(path))
    assert "2 bad rows" in str(err.value)
    assert "p.jsonl:1: " in str(err.value) and "p.jsonl:3: " in str(err.value)


def test_roles_and_keys_are_normalized(tmp_path):
    sharegpt = {
        "id": 17,
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "Human", "value": "Bye"},
            {"from": "chatgpt", "value": "Bye!"},
        ],
    }
    messages = {
        "messages": [{"role": "user", "content": "Q"}, {"role": "model", "content": "A"}],
        "category": "chat",
    }
    path = _write(tmp_path / "mix.jsonl", [sharegpt, messages, _user("x")])
    rows = load_conversations(str(path))
    assert [[t["role"] for t in r["conversations"]] for r in rows] == [
        ["system", "user", "assistant", "user", "assistant"],
        ["user", "assistant"],
        ["user"],
    ]
    assert rows[0]["conversations"][1] == {"role": "user", "content": "Hi"}
    assert [r["id"] for r in rows] == ["17", "mix-000002", "mix-000003"]
    assert [r["source"] for r in rows] == ["mix"] * 3
    assert [r["category"] for r in rows] == ["unknown", "chat", "unknown"]


SHAREGPT = [
    {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]},
    {
        "id": "b",
        "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Yo"}],
    },
]
NORMALIZED = [
    {
        "id": "a",
        "source": "share",
        "category": "unknown",
        "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}],
    },
    {
        "id": "b",
        "source": "share",
        "category": "unknown",
        "conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Yo"}],
    },
]


def _write_data_file(path: Path, rows: list[dict]) -> Path:
    """`rows` as a .json, .parquet (pyarrow) or .csv (turns as JSON text) file."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import csv

        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "conversations"])
            writer.writeheader()
            writer.writerows({"id": r["id"], "conversations": json.dumps(r["conversations"])} for r in rows)
    return path


@pytest.mark.parametrize("suffix", [".json", ".parquet", ".csv"])
def test_data_files_load_through_datasets(tmp_path, suffix):
    path = _write_data_file(tmp_path / f"share{suffix}", SHAREGPT)
    assert load_conversations(str(path)) == NORMALIZED


def test_parquet_rows_are_rejected_by_index(tmp_path, make_cfg):
    rows = [*SHAREGPT, {"id": "c", "conversations": [{"from": "bot", "value": "?"}]}]
    path = _write_data_file(tmp_path / "share.parquet", rows)
    cfg = make_cfg(f"prompts.source={path}")
    info = prepare_prompts(cfg)
    assert (info.rows, info.rejected) == (2, 1)
    [reject] = _read(run_paths(cfg).rejects)
    assert (reject["source"], reject["split"], reject["index"]) == (str(path), "train", 2)
    assert reject["reason"].startswith("field 'conversations[0].from': expected one of user/assistant/system")
    assert reject["raw"]["id"] == "c" and reject["raw"]["conversations"][0]["from"] == "bot"


def test_unreachable_hub_says_to_pass_a_local_file(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="pass a local JSONL file"):
        load_conversations("deepspec-tests/no-such-dataset")


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_conversations(str(tmp_path / "absent.jsonl"))


def test_prepare_drops_answers_and_duplicates(tmp_path, make_cfg):
    rows = [
        {"conversations": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}]},
        {"conversations": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A"}]},
        {"conversations": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]},
        {
            "conversations": [
                {"role": "user", "content": "Q3"},
                {"role": "assistant", "content": "A"},
                {"role": "user", "content": "Q4"},
            ]
        },
    ]
    source = _write(tmp_path / "src.jsonl", rows)
    cfg = make_cfg(f"prompts.source={source}")
    info = prepare_prompts(cfg)
    expected = {"rows": 3, "heldout": 0, "rejected": 0, "duplicates": 1, "source": str(source)}
    assert info == PromptsResult(path=str(run_paths(cfg).prompts), **expected, skipped=False)
    out = _read(run_paths(cfg).prompts)
    assert [[t["role"] for t in r["conversations"]] for r in out] == [
        ["system", "user"],
        ["user"],
        ["user", "user"],
    ]
    assert [r["id"] for r in out] == ["src-000001", "src-000002", "src-000004"]
    assert run_paths(cfg).heldout.read_text() == ""
    assert run_paths(cfg).rejects.read_text() == ""


def test_malformed_rows_are_set_aside_and_counted(tmp_path, make_cfg, tracking_uri):
    no_user = {"conversations": [{"role": "system", "content": "Be brief."}]}
    bad_role = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}
    source = _write(
        tmp_path / "mixed.jsonl",
        [_user("Q1"), '{"conversations": [', no_user, _user("Q2"), bad_role, [1, 2], _user("Q1")],
    )
    cfg = make_cfg(f"prompts.source={source}")
    info = prepare_prompts(cfg)
    expected = {"rows": 2, "heldout": 0, "rejected": 4, "duplicates": 1, "source": str(source)}
    assert info == PromptsResult(path=str(run_paths(cfg).prompts), **expected, skipped=False)

    rejects = _read(run_paths(cfg).rejects)
    assert [(r["source"], r["line"]) for r in rejects] == [(str(source), n) for n in (2, 3, 5, 6)]
    assert [r["reason"] for r in rejects] == [
        "not valid JSON (Expecting value at column 20)",
        "field 'conversations': the conversation has no user turn",
        "field 'conversations[1].role': expected one of user/assistant/system, got 'bot' "
        "(also accepted: human, gpt, chatgpt, bard, model)",
        "expected a JSON object, got list",
    ]
    assert [r["raw"] for r in rejects] == ['{"conversations": [', no_user, bad_role, [1, 2]]
    out = _read(run_paths(cfg).prompts)
    assert [r["conversations"][0]["content"] for r in out] == ["Q1", "Q2"]

    metrics = MlflowClient(tracking_uri).get_run(tracking.run_id(cfg)).data.metrics
    assert {k: metrics[f"prompts/{k}"] for k in ("rows", "heldout", "rejected", "duplicates")} == {
        "rows": 2,
        "heldout": 0,
        "rejected": 4,
        "duplicates": 1,
    }


def test_no_good_row_fails_naming_the_rejects_file(tmp_path, make_cfg):
    source = _write(tmp_path / "bad.jsonl", ["nope", {"conversations": [{"role": "x", "content": "y"}]}])
    cfg = make_cfg(f"prompts.source={source}")
    rejects = run_paths(cfg).rejects
    with pytest.raises(DataError, match="none of its 2 rows is usable") as err:
        prepare_prompts(cfg)
    assert str(rejects) in str(err.value) and "bad.jsonl:1: not valid JSON" in str(err.value)
    assert len(_read(rejects)) == 2
    assert not (run_paths(cfg).prompts_dir / "_DONE.json").exists()


def test_an_empty_source_fails(tmp_path, make_cfg):
    source = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        prepare_prompts(make_cfg(f"prompts.source={source}"))


def test_heldout_split_is_deterministic_and_order_free(tmp_path, make_cfg):
    rows = load_conversations("builtin")
    reversed_source = _write(tmp_path / "reversed.jsonl", list(reversed(rows)))
    first = make_cfg("prompts.heldout_fraction=0.25", run="a")
    again = make_cfg("prompts.heldout_fraction=0.25", run="b")
    flipped = make_cfg("prompts.heldout_fraction=0.25", f"prompts.source={reversed_source}", run="c")
    infos = [prepare_prompts(cfg) for cfg in (first, again, flipped)]
    held = [{r["id"] for r in _read(run_paths(cfg).heldout)} for cfg in (first, again, flipped)]
    assert held[0] == held[1] == held[2]
    assert 4 <= len(held[0]) <= 20
    assert all(i.rows + i.heldout == 48 for i in infos)
    train = {r["id"] for r in _read(run_paths(first).prompts)}
    assert not train & held[0]


def test_seed_draws_another_split(make_cfg):
    def held(seed: int, run: str) -> set[str]:
        cfg = make_cfg("prompts.heldout_fraction=0.25", f"prompts.seed={seed}", run=run)
        prepare_prompts(cfg)
        return {r["id"] for r in _read(run_paths(cfg).heldout)}

    assert held(0, "a") == held(0, "b")
    assert held(0, "a") != held(1, "c")


def test_real_runs_default_to_open_perfectblend_and_the_demo_stays_offline():
    assert compose().prompts.source == "mlabonne/open-perfectblend"
    assert compose().prompts.seed == 0
    assert compose(config_name="demo").prompts.source == "builtin"


def test_max_samples_keeps_the_first_rows(make_cfg):
    cfg = make_cfg("prompts.max_samples=5")
    assert prepare_prompts(cfg).rows == 5
    out = _read(run_paths(cfg).prompts)
    assert [r["id"] for r in out] == [f"builtin-chat-{i:03d}" for i in range(5)]


def test_rerun_skips_only_while_outputs_are_valid(make_cfg):
    cfg = make_cfg()
    assert prepare_prompts(cfg).skipped is False
    again = prepare_prompts(cfg)
    expected = {"rows": 48, "heldout": 0, "rejected": 0, "duplicates": 0, "source": "builtin"}
    assert again == PromptsResult(path=str(run_paths(cfg).prompts), **expected, skipped=True)

    path = run_paths(cfg).prompts
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # lose a row
    redone = prepare_prompts(cfg)
    assert redone.skipped is False and len(_read(path)) == 48

    other = make_cfg("prompts.max_samples=10")  # another config: its own folder, made anew
    assert run_paths(other).prompts_dir != run_paths(cfg).prompts_dir
    assert prepare_prompts(other).skipped is False and len(_read(run_paths(other).prompts)) == 10
    assert prepare_prompts(cfg).skipped is True  # the first config's prompts stay


def test_bad_heldout_fraction(make_cfg):
    """Refused while composing, before the stage runs."""
    with pytest.raises(ConfigError, match=r"prompts\.heldout_fraction=1\.0: expected a value in \[0, 1\)"):
        make_cfg("prompts.heldout_fraction=1.0")
