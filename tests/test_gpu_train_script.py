"""bench/gpu_train.py, the prepared GPU run of the training side, skips cleanly without CUDA, and its CPU
check runs every path (float32 parity, the bf16 recipe step of each algorithm, chunked SDPA against one
SDPA call and flex attention) at tiny shapes through the import shim, writing every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_train.py"


def run_script(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_gpu_train_skips_without_cuda(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    skipped = run_script([], {"OUT": str(out_dir)})
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stdout.strip().splitlines() == [
        "gpu_train: skipped: no CUDA device is present (run with --cpu-check for the CPU check)"
    ]
    assert list(out_dir.iterdir()) == []


def test_gpu_train_cpu_check_runs_every_path_and_writes_its_figures(tmp_path):
    out_dir = tmp_path / "out"  # $OUT names the results file when --out does not
    done = run_script(["--cpu-check", "--force-shim"], {"OUT": str(out_dir)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out_dir / "gpu_train.json").read_text())
    assert record["import"]["mode"] == "shim" and record["import"]["forbidden_loaded"] == []
    assert {n: p["status"] for n, p in record["phases"].items()} == dict.fromkeys(
        ("parity", "steps", "attention"), "done"
    )
    assert record["failed"] == [] and record["git_commit"] and record["command"]

    parity = record["figures"]["parity"]
    assert parity["ok"] and parity["chunk_masks_equal"] and parity["shape"]["chunks"] > 2
    assert parity["flex"]["token_mask_equal"]  # this torch has flex attention

    for name in ("dflash", "dspark", "eagle3"):
        step = record["figures"]["steps"][name]
        assert step["step_s"] > 0 and step["tokens_per_s"] > 0 and step["supervised_rows"] > 0, name
        assert len(step["step_s_each"]) == 2 and all(loss > 0 for loss in step["loss_each"])

    for algo, block in (("dflash", 8), ("dspark", 7)):
        attention = record["figures"]["attention"][algo]
        assert attention["block"] == block and attention["queries"] == 16 * block
        variants = attention["variants"]
        assert set(variants) == {"sdpa_chunked", "sdpa_one_call", "flex_eager"}
        for name, v in variants.items():
            assert v["ok"] and v["rel_err"]["out"] <= v["tolerance"] == 1e-2, (name, v)
        assert set(variants["sdpa_chunked"]["rel_err"]) == {"out", "dq", "dk", "dv"}
        assert variants["flex_eager"]["forward_backward_s"] is None  # no flex backward on the CPU
