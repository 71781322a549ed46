"""The prompts stage: loading and checking sources, dedup, the held-out split, skipping on re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepspec.models.errors import ConfigError, DataError
from deepspec.tasks.config import compose
from deepspec.tasks.prompts import load_conversations, prepare_prompts


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
    def make(*overrides: str, run: str = "run"):
        return compose([f"run_dir={tmp_path / run}", f"tracking.uri={tracking_uri}", *overrides])

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
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: not valid JSON"):
        load_conversations(str(path))


def test_bad_role_names_file_line_and_field(tmp_path):
    bad = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}
    path = _write(tmp_path / "prompts.jsonl", [_user("a"), _user("b"), _user("c"), bad])
    with pytest.raises(DataError) as err:
        load_conversations(str(path))
    expected = "field 'conversations[1].role': expected one of user/assistant/system, got 'bot'"
    assert f"prompts.jsonl line 4: {expected}" in str(err.value)


def test_no_user_turn_is_an_error(tmp_path):
    row = {
        "conversations": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi"}]
    }
    path = _write(tmp_path / "p.jsonl", [_user("fine"), row])
    with pytest.raises(
        DataError, match=r"p\.jsonl line 2: field 'conversations': the conversation has no user turn"
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
    path = _write(tmp_path / "p.jsonl", [row])
    with pytest.raises(DataError, match="p.jsonl line 1: ") as err:
        load_conversations(str(path))
    assert field in str(err.value)


def test_all_bad_rows_are_listed_at_once(tmp_path):
    path = _write(
        tmp_path / "p.jsonl", ["nope", _user("ok"), {"conversations": [{"role": "x", "content": "y"}]}]
    )
    with pytest.raises(DataError) as err:
        load_conversations(str(path))
    assert "2 bad rows" in str(err.value)
    assert "line 1" in str(err.value) and "line 3" in str(err.value)


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


def test_dataset_files_load_through_datasets(tmp_path):
    rows = [{"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}]
    path = tmp_path / "share.json"
    path.write_text(json.dumps(rows))
    loaded = load_conversations(str(path))
    assert loaded == [
        {
            "id": "a",
            "source": "share",
            "category": "unknown",
            "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}],
        }
    ]


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
    assert info == {"rows": 3, "heldout": 0, "duplicates": 1, "source": str(source), "skipped": False}
    out = _read(Path(cfg.run_dir) / "prompts" / "prompts.jsonl")
    assert [[t["role"] for t in r["conversations"]] for r in out] == [
        ["system", "user"],
        ["user"],
        ["user", "user"],
    ]
    assert [r["id"] for r in out] == ["src-000001", "src-000002", "src-000004"]
    assert (Path(cfg.run_dir) / "prompts" / "heldout.jsonl").read_text() == ""


def test_heldout_split_is_deterministic_and_order_free(tmp_path, make_cfg):
    rows = load_conversations("builtin")
    reversed_source = _write(tmp_path / "reversed.jsonl", list(reversed(rows)))
    first = make_cfg("prompts.heldout_fraction=0.25", run="a")
    again = make_cfg("prompts.heldout_fraction=0.25", run="b")
    flipped = make_cfg("prompts.heldout_fraction=0.25", f"prompts.source={reversed_source}", run="c")
    infos = [prepare_prompts(cfg) for cfg in (first, again, flipped)]
    held = [
        {r["id"] for r in _read(Path(cfg.run_dir) / "prompts" / "heldout.jsonl")}
        for cfg in (first, again, flipped)
    ]
    assert held[0] == held[1] == held[2]
    assert 4 <= len(held[0]) <= 20
    assert all(i["rows"] + i["heldout"] == 48 for i in infos)
    train = {r["id"] for r in _read(Path(first.run_dir) / "prompts" / "prompts.jsonl")}
    assert not train & held[0]


def test_max_samples_keeps_the_first_rows(make_cfg):
    cfg = make_cfg("prompts.max_samples=5")
    assert prepare_prompts(cfg)["rows"] == 5
    out = _read(Path(cfg.run_dir) / "prompts" / "prompts.jsonl")
    assert [r["id"] for r in out] == [f"builtin-chat-{i:03d}" for i in range(5)]


def test_rerun_skips_only_while_outputs_are_valid(make_cfg):
    cfg = make_cfg()
    assert prepare_prompts(cfg)["skipped"] is False
    again = prepare_prompts(cfg)
    assert again == {"rows": 48, "heldout": 0, "duplicates": 0, "source": "builtin", "skipped": True}

    path = Path(cfg.run_dir) / "prompts" / "prompts.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # lose a row
    redone = prepare_prompts(cfg)
    assert redone["skipped"] is False and len(_read(path)) == 48

    assert prepare_prompts(make_cfg("prompts.max_samples=10"))["skipped"] is False  # another config


def test_bad_heldout_fraction(make_cfg):
    with pytest.raises(ConfigError, match="prompts.heldout_fraction"):
        prepare_prompts(make_cfg("prompts.heldout_fraction=1.0"))
