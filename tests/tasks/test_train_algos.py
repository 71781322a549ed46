"""The train stage's algorithms: config checks at compose time, the teacher (captured online, recomputed
from the cache through the target's remaining layers), Eagle3's vocabulary counts, and each algorithm's
training loss on the real stories260k target."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch
from support import tiny
from support.drafts import target_draft_inputs
from support.stories import build_cache_untracked, stories_overrides, write_answers
from transformers import AutoModelForCausalLM

from deepspec.models.drafts import DRAFTS, draft_spec
from deepspec.models.errors import ConfigError
from deepspec.models.target import load_target, load_tokenizer
from deepspec.models.teacher import Teacher, load_target_tail, tail_start
from deepspec.tasks.cache.format import iter_samples
from deepspec.tasks.cache.loader import open_stream, supervised_token_counts
from deepspec.tasks.config import algo_settings, compose
from deepspec.tasks.paths import run_paths
from deepspec.tasks.train.schedule import deepspeed_config
from deepspec.tasks.train.stage import stale_build_locks

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
    assert (eagle3.ttt_steps, eagle3.step_decay, eagle3.draft_vocab_size) == (7, 0.8, None)
    assert (dspark.block_size, dspark.num_layers, dspark.loss_decay, dspark.markov_rank) == (7, 5, 4.0, 256)
    assert (dspark.markov_head_type, dspark.confidence_head) == ("vanilla", True)
    assert (dspark.ce_weight, dspark.l1_weight, dspark.confidence_weight) == (0.1, 0.9, 1.0)
    # upstream's num_anchors (config/dflash/*.py, config/dspark/dspark_qwen3_4b_online.py)
    assert dspark.anchors_per_sequence == compose(["algo=dflash"]).algo.anchors_per_sequence == 512
    for algo in DRAFTS:
        settings = algo_settings(compose([f"algo={algo}", "target=stories260k"]))
        assert isinstance(settings, DRAFTS[algo].settings)


def test_the_engine_takes_adamw_betas_from_the_train_section():
    params = deepspeed_config(compose([]), 1)["optimizer"]["params"]
    assert params["betas"] == [0.9, 0.999]  # upstream's: torch's AdamW defaults
    tuned = deepspeed_config(compose(["train.betas=[0.8,0.95]"]), 1)["optimizer"]["params"]
    assert tuned["betas"] == [0.8, 0.95]


def test_every_preset_target_takes_every_algorithm_without_overrides():
    """Eagle3 fuses three layers: the Qwen3 and Gemma presets get EAGLE3's own from conf/target_algo/,
    DFlash and DSpark keep the preset's five."""
    for target in ("qwen3_4b", "qwen3_8b", "qwen3_14b", "gemma4_12b", "smollm2_135m", "stories260k"):
        layers = {
            algo: list(compose([f"target={target}", f"algo={algo}"]).target.layer_ids) for algo in DRAFTS
        }
        assert len(layers["eagle3"]) == 3 and layers["dflash"] == layers["dspark"], target
    assert list(compose(["target=qwen3_4b", "algo=eagle3"]).target.layer_ids) == [1, 17, 32]
    assert list(compose(["target=qwen3_4b", "algo=dflash"]).target.layer_ids) == [1, 9, 17, 25, 33]


def test_algo_sections_are_typed_by_their_algorithm():
    """Each algorithm's own schema: a key of another algorithm fails, naming the keys this one takes."""
    with pytest.raises(
        ConfigError, match=r"algo.block_size is not a setting of algo=eagle3; its keys: .*ttt_steps"
    ):
        compose(["algo=eagle3", "algo.block_size=3"])
    with pytest.raises(ConfigError, match="algo.ttt_steps is not a setting of algo=dflash"):
        compose(["algo.ttt_steps=3"])


def test_algo_problems_are_listed_at_once_when_composing():
    with pytest.raises(ConfigError) as err:
        compose(["algo=eagle3", "target=qwen3_4b", "algo.ttt_steps=0", "target.layer_ids=[1,9,17,25,33]"])
    message = str(err.value)
    assert "2 problems" in message and "algo.ttt_steps=0" in message
    assert "target.layer_ids=[1, 9, 17, 25, 33]" in message and "'target.layer_ids=[1,17,32]'" in message
    with pytest.raises(ConfigError, match="needs a Markov head"):
        compose(["algo=dspark", "algo.markov_rank=0"])
    with pytest.raises(ConfigError, match="Could not find 'algo/medusa'"):
        compose(["algo=medusa"])


def test_teacher_tail_start():
    text = SimpleNamespace(num_hidden_layers=5, model_type="llama")
    assert tail_start([0, 2, 4], text, online=False) is None  # layer 4 is the last: nothing to run
    assert tail_start([0, 2], text, online=False) == 3
    assert tail_start([0, 2], text, online=True) is None  # captured in the target's own forward
    gemma4 = SimpleNamespace(num_hidden_layers=5, model_type="gemma4_text", hidden_size_per_layer_input=256)
    with pytest.raises(ConfigError, match="per-layer token inputs.*storage.mode=online"):
        tail_start([0, 2], gemma4, online=False)
    assert tail_start([0, 2, 4], gemma4, online=False) is None


def test_teacher_caps_logits_as_gemma_does():
    text = SimpleNamespace(num_hidden_layers=5, hidden_size=4, final_logit_softcapping=2.0)
    head = torch.randn(7, 4) * 10
    teacher = Teacher.for_target(text, head, [0, 2, 4], torch.device("cpu"), online=True, path="unused")
    hidden = torch.randn(3, 4)
    torch.testing.assert_close(teacher.logits(hidden), 2.0 * torch.tanh(hidden @ head.t() / 2.0))


# ----------------------------------------------------------------------------------------------------
# The target's remaining layers


@pytest.mark.parametrize("first", [1, 3, 4])
def test_tail_of_stories_gives_the_final_hidden_state(assets_dir, first):
    path = assets_dir / "models" / "stories260k"
    model, tokenizer = load_target(str(path))
    ids = torch.tensor([tokenizer("Once upon a time, there was a girl who liked to play").input_ids])
    with torch.no_grad():
        out = model.model(input_ids=ids, output_hidden_states=True)
    # transformers records the last layer's output normalised: a cached layer 4 is the final state
    torch.testing.assert_close(out.hidden_states[5], out.last_hidden_state, rtol=0, atol=0)
    tail = load_target_tail(str(path), first, torch.device("cpu"))
    assert len(tail.base.layers) == 5 - first
    assert sum(p.numel() for p in tail.parameters()) < sum(p.numel() for p in model.model.layers.parameters())
    torch.testing.assert_close(tail(out.hidden_states[first][0]), out.last_hidden_state[0])


SLIDING = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
WINDOWED = {"sliding_window": 3, "layer_types": SLIDING, "max_position_embeddings": 64}


@pytest.mark.parametrize(
    "config",
    [
        tiny.qwen3(head_dim=8, use_sliding_window=True, **WINDOWED),
        tiny.gemma3(num_attention_heads=4, num_key_value_heads=2, head_dim=8, layers=4, **WINDOWED),
    ],
    ids=["qwen3-sliding", "gemma3"],
)
def test_tail_follows_each_layers_attention_type(tmp_path, config):
    """Layers keep their sliding or full attention when the ones before them are dropped."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        out = model.model(input_ids=ids, output_hidden_states=True)
    for first in (1, 2):
        tail = load_target_tail(str(tmp_path), first, torch.device("cpu"))
        torch.testing.assert_close(tail(out.hidden_states[first][0]), out.last_hidden_state[0])


# ----------------------------------------------------------------------------------------------------
# The teacher and the recipes on stories260k, from a cache of layers 0..2 and online

STORIES = [  # four stories with answers long enough to train on
    ("Once upon a time, there was a little dog", " named Max. Max loved to play with his toys."),
    ("Lily went to the park", " and saw a big red ball. She was very happy."),
    ("Tom had a small boat", " that he took to the lake every day. One day, the wind was strong."),
    ("A bird sang in the tree", " and the sun was warm. The bird flew down to say hello to Tim."),
]


@pytest.fixture(scope="module")
def stories_run(assets_dir, tmp_path_factory, one_thread):
    """Overrides of a run with answers and a cache of layers 0, 1, 2 (the teacher runs layers 3, 4)."""
    overrides = stories_overrides(assets_dir, tmp_path_factory.mktemp("algos"), "target.layer_ids=[0,1,2]")
    write_answers(overrides, STORIES)
    build_cache_untracked(overrides)
    model, _ = load_target(str(assets_dir / "models" / "stories260k"))
    return overrides, model


def teacher_of(cfg, model) -> Teacher:
    online = cfg.storage.mode == "online"
    return Teacher.for_target(
        model.config, model.lm_head.weight, list(cfg.target.layer_ids), torch.device("cpu"), online=online,
        path=cfg.target.path,
    )  # fmt: skip


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
    teacher = teacher_of(cfg, model)
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
    for s in iter_samples(run_paths(cfg).cache_url):
        expected += torch.bincount(s["input_ids"][s["loss_mask"]], minlength=512)
    assert torch.equal(cached, expected) and torch.equal(online, expected) and expected.sum() > 20


@pytest.mark.parametrize(
    "algo, extra",
    [
        ("dflash", []),
        ("eagle3", ["algo.ttt_steps=3"]),
        ("eagle3", ["algo.ttt_steps=3", "algo.draft_vocab_size=48"]),
        ("dspark", ["algo.num_layers=1", "algo.block_size=4", "algo.markov_rank=16"]),
        (
            "dspark",
            ["algo.num_layers=1", "algo.block_size=4", "algo.markov_head_type=rnn", "storage.mode=online"],
        ),
    ],
    ids=["dflash", "eagle3", "eagle3-reduced-vocab", "dspark", "dspark-online-rnn"],
)
def test_training_losses_learn(stories_run, algo, extra):
    """Each algorithm's build and micro-batch loss (its `DraftSpec`), stepped by a plain optimizer: the
    model stands in for the engine, as the recipe passes it."""

    overrides, model = stories_run
    cfg = compose([*overrides, f"algo={algo}", *extra])
    spec, settings = draft_spec(algo), algo_settings(cfg)
    teacher = teacher_of(cfg, model) if spec.needs_teacher else None
    inputs = target_draft_inputs(cfg, model)  # the recipe's, its token counts from the data
    torch.manual_seed(0)
    draft = spec.build(settings, inputs)
    samples = list(open_stream(cfg, epochs=1, final_hidden=teacher is not None))
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(12):
        loss, stats = spec.training_loss(
            draft, draft, samples, settings, teacher, torch.Generator().manual_seed(0)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0], losses
    assert stats["slot_counts"].shape == (draft.num_draft_tokens,) and stats["slot_counts"][0] > 0
    if "draft_vocab_size" in " ".join(extra):
        assert draft.cfg.draft_vocab_size == 48 and draft.cfg.reduced_vocab
