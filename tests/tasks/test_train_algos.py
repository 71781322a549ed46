"""The train stage's algorithms: config checks, the teacher (captured online, recomputed from the cache
through the target's remaining layers), Eagle3's vocabulary counts, and each recipe's training step on
the real stories260k target."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen3Config

from deepspec.models.errors import ConfigError
from deepspec.models.target import load_target, load_tokenizer
from deepspec.tasks.cache.format import iter_samples
from deepspec.tasks.cache.loader import open_stream, supervised_token_counts
from deepspec.tasks.config import compose
from deepspec.tasks.train.stage import (
    RECIPES,
    Teacher,
    algo_identity,
    check_algo,
    load_target_tail,
    stale_build_locks,
    teacher_tail_start,
)

# ----------------------------------------------------------------------------------------------------
# Configuration


def test_a_stale_extension_build_lock_is_found(tmp_path, monkeypatch):
    """A DeepSpeed op build killed midway leaves its lock, and the next build waits on it forever: the
    train stage names such locks before it launches the ranks."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    building, killed = tmp_path / "cpu_adam" / "lock", tmp_path / "deepspeed_shm_comm" / "lock"
    for lock in (building, killed):
        lock.parent.mkdir()
        lock.touch()
    os.utime(killed, (time.time() - 3600, time.time() - 3600))
    assert [(lock, round(age / 60)) for lock, age in stale_build_locks()] == [(killed, 60)]


def test_presets_carry_the_upstream_recipes():
    eagle3, dspark = compose(["algo=eagle3"]).algo, compose(["algo=dspark"]).algo
    assert (eagle3.block_size, eagle3.num_layers, eagle3.step_decay, eagle3.draft_vocab_size) == (
        7,
        1,
        0.8,
        None,
    )
    assert (dspark.block_size, dspark.num_layers, dspark.loss_decay, dspark.markov_rank) == (7, 5, 4.0, 256)
    assert (dspark.markov_head_type, dspark.confidence_head) == ("vanilla", True)
    assert (dspark.ce_weight, dspark.l1_weight, dspark.confidence_weight) == (0.1, 0.9, 1.0)
    for algo in ("dflash", "eagle3", "dspark"):
        check_algo(compose([f"algo={algo}", "target=stories260k"]))


def test_dflash_hashes_ignore_the_other_algorithms_fields():
    """Fields added for Eagle3 and DSpark are null for DFlash and left out of its hashes, so existing
    DFlash runs keep their finished stages."""
    assert algo_identity(compose()) == {
        "name": "dflash", "block_size": 7, "num_layers": 5, "loss_decay": 4.0, "anchors_per_sequence": 64,
    }  # fmt: skip


def test_algo_problems_are_listed_at_once():
    with pytest.raises(ConfigError) as err:
        check_algo(compose(["algo=eagle3", "target=qwen3_4b", "algo.num_layers=2", "algo.step_decay=null"]))
    message = str(err.value)
    assert "algo.step_decay is null" in message and "algo.num_layers=2" in message
    assert "target.layer_ids=[1, 9, 17, 25, 33]" in message and "'target.layer_ids=[1,17,32]'" in message
    with pytest.raises(ConfigError, match="algo.markov_rank is null"):
        check_algo(compose(["algo=dspark", "algo.markov_rank=null"]))
    with pytest.raises(ConfigError, match="expected one of"):
        check_algo(compose(["algo.name=medusa"]))


def test_teacher_tail_start():
    text = SimpleNamespace(num_hidden_layers=5, model_type="llama")
    stories = ["target=stories260k"]
    assert teacher_tail_start(compose(stories), text) is None  # layer 4 is the last: nothing to run
    assert teacher_tail_start(compose([*stories, "target.layer_ids=[0,2]"]), text) == 3
    online = compose([*stories, "target.layer_ids=[0,2]", "storage.mode=online"])
    assert teacher_tail_start(online, text) is None  # captured in the target's own forward
    gemma4 = SimpleNamespace(num_hidden_layers=5, model_type="gemma4_text", hidden_size_per_layer_input=256)
    with pytest.raises(ConfigError, match="per-layer token inputs.*storage.mode=online"):
        teacher_tail_start(compose([*stories, "target.layer_ids=[0,2]"]), gemma4)
    assert teacher_tail_start(compose(stories), gemma4) is None


def test_teacher_caps_logits_as_gemma_does():
    cfg = compose(["target=stories260k", "storage.mode=online"])
    text = SimpleNamespace(num_hidden_layers=5, hidden_size=4, final_logit_softcapping=2.0)
    head = torch.randn(7, 4) * 10
    teacher = Teacher(cfg, text, head, torch.device("cpu"))
    hidden = torch.randn(3, 4)
    torch.testing.assert_close(teacher.logits(hidden), 2.0 * torch.tanh(hidden @ head.t() / 2.0))


# ----------------------------------------------------------------------------------------------------
# The target's remaining layers


def _tail_config(target_cfg):
    return {"path": str(target_cfg), "gguf_file": None, "revision": None, "dtype": "float32"}


@pytest.mark.parametrize("first", [1, 3, 4])
def test_tail_of_stories_gives_the_final_hidden_state(assets_dir, first):
    from omegaconf import OmegaConf

    path = assets_dir / "models" / "stories260k"
    model, tokenizer = load_target(str(path))
    ids = torch.tensor([tokenizer("Once upon a time, there was a girl who liked to play").input_ids])
    with torch.no_grad():
        out = model.model(input_ids=ids, output_hidden_states=True)
    # transformers records the last layer's output normalised: a cached layer 4 is the final state
    torch.testing.assert_close(out.hidden_states[5], out.last_hidden_state, rtol=0, atol=0)
    tail = load_target_tail(OmegaConf.create(_tail_config(path)), first, torch.device("cpu"))
    assert len(tail.base.layers) == 5 - first
    assert sum(p.numel() for p in tail.parameters()) < sum(p.numel() for p in model.model.layers.parameters())
    torch.testing.assert_close(tail(out.hidden_states[first][0]), out.last_hidden_state[0])


TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "num_hidden_layers": 4, "vocab_size": 64, "max_position_embeddings": 64}  # fmt: skip
SLIDING = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]


@pytest.mark.parametrize(
    "config",
    [
        Qwen3Config(**TINY, use_sliding_window=True, sliding_window=3, layer_types=SLIDING),
        Gemma3TextConfig(**TINY, sliding_window=3, layer_types=SLIDING, final_logit_softcapping=30.0),
    ],
    ids=["qwen3-sliding", "gemma3"],
)
def test_tail_follows_each_layers_attention_type(tmp_path, config):
    """Layers keep their sliding or full attention when the ones before them are dropped."""
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        out = model.model(input_ids=ids, output_hidden_states=True)
    for first in (1, 2):
        tail = load_target_tail(OmegaConf.create(_tail_config(tmp_path)), first, torch.device("cpu"))
        torch.testing.assert_close(tail(out.hidden_states[first][0]), out.last_hidden_state[0])


# ----------------------------------------------------------------------------------------------------
# The teacher and the recipes on stories260k, from a cache of layers 0..2 and online

STORIES = [
    ("Once upon a time, there was a little dog", " named Max. Max loved to play with his toys."),
    ("Lily went to the park", " and saw a big red ball. She was very happy."),
    ("Tom had a small boat", " that he took to the lake every day. One day, the wind was strong."),
    ("A bird sang in the tree", " and the sun was warm. The bird flew down to say hello to Tim."),
]


@pytest.fixture(scope="module")
def stories_run(assets_dir, tmp_path_factory):
    """Overrides of a run with answers and a cache of layers 0, 1, 2 (the teacher runs layers 3, 4)."""
    from deepspec.tasks.cache.stage import build_cache

    tmp = tmp_path_factory.mktemp("algos")
    (tmp / "regen").mkdir()
    rows = [
        {
            "id": f"story-{i}",
            "conversations": [{"role": "user", "content": p}, {"role": "assistant", "content": a}],
        }
        for i, (p, a) in enumerate(STORIES)
    ]
    (tmp / "regen" / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        "target=stories260k",
        f"target.path={assets_dir / 'models' / 'stories260k'}",
        "target.layer_ids=[0,1,2]",
        f"run_dir={tmp}",
        "storage.samples_per_shard=2",
    ]
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("deepspec.tasks.tracking.log_metrics", lambda *args, **kwargs: None)
        build_cache(compose(overrides))
    model, _ = load_target(str(assets_dir / "models" / "stories260k"))
    return overrides, model


def _final_states(model, samples):
    with torch.no_grad():
        return {
            s["sample_id"]: model.model(input_ids=s["input_ids"][None]).last_hidden_state[0] for s in samples
        }


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_teacher_gives_the_targets_final_state(stories_run, mode):
    overrides, model = stories_run
    cfg = compose([*overrides, f"storage.mode={mode}"])
    samples = list(open_stream(cfg, epochs=1, final_hidden=True))
    assert ("final_hidden" in samples[0]) == (mode == "online")
    teacher = Teacher(cfg, model.config, model.lm_head.weight, torch.device("cpu"))
    assert (teacher.tail is None) == (mode == "online")
    expected = _final_states(model, samples)
    for s in samples:
        final = teacher.final_hidden(s)
        if mode == "online":
            torch.testing.assert_close(final, expected[s["sample_id"]], atol=1e-5, rtol=1e-5)
        else:  # from the cache's bf16-rounded layer 2
            torch.testing.assert_close(final, expected[s["sample_id"]], atol=0.05, rtol=0.02)
        logits = teacher.logits(final)
        target_logits = model.lm_head(expected[s["sample_id"]])
        assert (logits.argmax(-1) == target_logits.argmax(-1)).float().mean() > 0.9


def test_supervised_token_counts_agree_in_both_modes(stories_run):
    overrides, _ = stories_run
    cfg = compose(overrides)
    tokenizer = load_tokenizer(cfg.target.path)
    cached = supervised_token_counts(cfg, tokenizer, 512)
    online = supervised_token_counts(compose([*overrides, "storage.mode=online"]), tokenizer, 512)
    expected = torch.zeros(512, dtype=torch.long)
    for s in iter_samples(str(cfg.storage.url)):
        expected += torch.bincount(s["input_ids"][s["loss_mask"]], minlength=512)
    assert torch.equal(cached, expected) and torch.equal(online, expected) and expected.sum() > 20


@pytest.mark.parametrize(
    "algo, extra",
    [
        ("dflash", []),
        ("eagle3", ["algo.block_size=3"]),
        ("eagle3", ["algo.block_size=3", "algo.draft_vocab_size=48"]),
        ("dspark", ["algo.num_layers=1", "algo.block_size=4", "algo.markov_rank=16"]),
        (
            "dspark",
            ["algo.num_layers=1", "algo.block_size=4", "algo.markov_head_type=rnn", "storage.mode=online"],
        ),
    ],
    ids=["dflash", "eagle3", "eagle3-reduced-vocab", "dspark", "dspark-online-rnn"],
)
def test_recipe_steps_learn(stories_run, algo, extra):
    """Each recipe's micro-batch loss, stepped by a plain optimizer (the model stands in for the engine)."""
    from transformers import AutoConfig

    overrides, model = stories_run
    cfg = compose([*overrides, f"algo={algo}", *extra])
    check_algo(cfg)
    tokenizer = load_tokenizer(cfg.target.path)
    embed, head = model.get_input_embeddings().weight.detach(), model.lm_head.weight.detach()
    target_config = AutoConfig.from_pretrained(cfg.target.path)
    teacher = None if algo == "dflash" else Teacher(cfg, target_config, head, torch.device("cpu"))
    torch.manual_seed(0)
    recipe = RECIPES[algo](cfg, target_config, tokenizer, embed, head, torch.device("cpu"), teacher)
    samples = list(open_stream(cfg, epochs=1, final_hidden=teacher is not None))
    optimizer = torch.optim.AdamW([p for p in recipe.model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(12):
        loss, stats = recipe.step(recipe.model, samples, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0], losses
    assert stats["slot_counts"].shape == (recipe.slots,) and stats["slot_counts"][0] > 0
    if "draft_vocab_size" in " ".join(extra):
        assert recipe.model.cfg.draft_vocab_size == 48 and recipe.model.cfg.reduced_vocab
