"""The prepared GPU runs skip cleanly without CUDA, and their CPU checks run the whole path and write their
figures: bench/gpu_reference.py (import shim, data, training, step time, evaluation on stories260k) and
bench/gpu_decode_split.py (a round's draft, verify and overhead time at each context length)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_reference.py"
ALGOS = ("eagle3", "dflash", "dspark")


def run_script(
    args: list[str], env: dict[str, str], timeout: int, script: Path = SCRIPT
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.integration
@pytest.mark.slow
def test_gpu_reference_skips_without_cuda_and_its_cpu_check_reports_every_figure(assets_dir, tmp_path):
    # (a) no CUDA device and no --device cpu: one line, exit 0, no results file
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    skipped = run_script([], {"CUDA_VISIBLE_DEVICES": "", "OUT": str(out_dir)}, timeout=120)
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stdout.strip().splitlines() == [
        "gpu_reference: skipped: no CUDA device is present (run with --device cpu --smoke for the CPU check)"
    ]
    assert list(out_dir.iterdir()) == []

    # (b) the CPU check on stories260k, deepspec.models loaded through the script's import shim
    if not (assets_dir / "models" / "stories260k").is_dir():
        pytest.skip(f"{assets_dir / 'models' / 'stories260k'} is absent")
    out = tmp_path / "smoke.json"
    done = run_script(
        ["--device", "cpu", "--smoke", "--force-shim", "--out", str(out)],
        {"DEEPSPEC_ASSETS": str(assets_dir), "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert {name: p["status"] for name, p in record["phases"].items()} == {
        name: "done" for name in ("target", "data", "train", "step_time", "eval")
    }
    imports = record["import"]
    assert imports["mode"] == "shim" and Path(imports["models_dir"]) == REPO / "models"
    assert imports["forbidden_loaded"] == []  # no deepspec.tasks, omegaconf, prefect, mlflow, deepspeed
    figures = record["figures"]
    for name in ALGOS:
        assert figures["train"][name]["steps"] == figures["train"][name]["planned_steps"] > 1
        assert figures["step_time"]["algos"][name]["step_s"] > 0
    for key in ("T=0", "T=1"):
        per_algo = figures["eval"]["temperatures"][key]
        assert set(per_algo) == set(ALGOS)
        for name in ALGOS:
            assert per_algo[name]["tau_macro"] >= 1.0
            assert all(f["tau"] >= 1.0 for f in per_algo[name]["benchmarks"].values())
            if key == "T=0":  # lossless: a float32 target's greedy output is the plain one
                assert per_algo[name]["greedy_match"] == 1.0


def test_gpu_decode_split_skips_without_cuda_and_its_cpu_check_splits_every_round(tmp_path):
    split = REPO / "bench" / "gpu_decode_split.py"
    skipped = run_script([], {"CUDA_VISIBLE_DEVICES": ""}, timeout=120, script=split)
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stdout.strip().splitlines() == [
        "gpu_decode_split: no CUDA device here; nothing to measure (use --device cpu for the check)"
    ]
    out = tmp_path / "split.json"
    args = ["--device", "cpu", "--smoke", "--force-shim", "--out", str(out)]
    done = run_script(args, {"CUDA_VISIBLE_DEVICES": ""}, timeout=300, script=split)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["import"]["mode"] == "shim" and record["import"]["forbidden_loaded"] == []
    figures = record["figures"]
    assert set(figures["t1_s"]) == {"16", "64"} and all(t > 0 for t in figures["t1_s"].values())
    assert figures["attention"] == "deepspec_packed_gqa_sdpa"  # as load_target gives a target
    for name in ("dflash", "dspark", "eagle3"):
        for context, row in figures["algos"][name].items():
            assert row["rounds"] > 0 and row["draft_s"] > 0 and row["verify_s"] > 0, (name, context)
            assert 0 <= row["overhead_share"] < 0.5, (name, context, row)
