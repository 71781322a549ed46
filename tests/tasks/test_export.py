"""The export stage writes each algorithm's engine layout from the trained draft, validates it, skips an
up-to-date export and refuses a draft of another algorithm; stories260k drafts saved as training saves
them (stories260k ties its embedding and LM head, which DSpark's export stores under both names)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from support.drafts import save_untrained_draft

from deepspec.models.drafts import DRAFTS, load_draft
from deepspec.models.errors import ConfigError, DeepSpecError
from deepspec.models.target import load_target
from deepspec.tasks.config import compose
from deepspec.tasks.export import export
from deepspec.tasks.paths import run_paths

SMALL = {
    "dflash": ["algo.num_layers=1", "algo.block_size=4"],
    "eagle3": ["algo.ttt_steps=3", "algo.draft_vocab_size=null"],
    "dspark": ["algo.num_layers=1", "algo.block_size=4", "algo.markov_rank=16"],
}
ARCHITECTURES = {
    "dflash": "DFlashDraftModel",
    "eagle3": "LlamaForCausalLMEagle3",
    "dspark": "Qwen3DSparkModel",
}


@pytest.mark.parametrize("algo", ["dflash", "eagle3", "dspark"])
def test_export_writes_and_validates_each_layout(assets_dir, tracking_uri, tmp_path, algo):
    stories = assets_dir / "models" / "stories260k"
    cfg = compose(
        ["target=stories260k", f"target.path={stories}", f"run_dir={tmp_path}", f"algo={algo}",
         f"tracking.uri={tracking_uri}", *SMALL[algo]]
    )  # fmt: skip
    target, _ = load_target(str(stories))
    model = save_untrained_draft(cfg, target)

    record = export(cfg)
    out = run_paths(cfg).export_dir
    assert out == tmp_path / "export" / algo and record.architecture == ARCHITECTURES[algo]
    assert record.path == str(out) and DRAFTS[algo].validate_export(out) == []
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[algo]]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    # DFlash and Eagle3 engines share the target's embedding; upstream's DSpark loader needs it saved
    assert ("embed_tokens.weight" in names) == (algo == "dspark")
    assert ("lm_head.weight" in names) == (algo != "dflash")

    # the export loads back into the same draft: same logits on a real context
    embed, head = target.get_input_embeddings().weight, target.lm_head.weight
    again = load_draft(out, embed, head)
    ids = torch.tensor([1, 385, 328, 432, 261])
    with torch.no_grad():
        out_states = target.model(input_ids=ids[None], output_hidden_states=True).hidden_states
    features = torch.cat([out_states[i + 1][0] for i in cfg.target.layer_ids], dim=-1)
    extra = {"context_ids": ids[:4]} if algo == "eagle3" else {}
    torch.testing.assert_close(
        again.draft_logits(features[:4], int(ids[4]), **extra),
        model.eval().draft_logits(features[:4], int(ids[4]), **extra),
    )

    assert export(cfg).skipped is True
    (out / "config.json").write_text("{}")  # a broken export is written again, not skipped
    assert export(cfg).skipped is False and DRAFTS[algo].validate_export(out) == []


def test_export_refuses_a_draft_of_another_algorithm(assets_dir, tmp_path):
    stories = assets_dir / "models" / "stories260k"
    overrides = ["target=stories260k", f"target.path={stories}", f"run_dir={tmp_path}", *SMALL["dflash"]]
    target, _ = load_target(str(stories))
    save_untrained_draft(compose(overrides), target)
    dspark = compose([*overrides, "algo=dspark"])
    with pytest.raises(DeepSpecError, match=r"no trained draft at .*train/dspark"):  # each algorithm its own
        export(dspark)
    (tmp_path / "train" / "dflash").rename(tmp_path / "train" / "dspark")  # another algorithm's, by hand
    with pytest.raises(ConfigError, match="is a dflash draft, but algo=dspark"):
        export(dspark)
