"""Stage `release`: the run's export becomes the released draft only when it beats the released one.

    deepspec retrain target=stories260k prompts.source=data/prompts.jsonl release.dir=runs/release

The last step of the `retrain` flow (`flows/pipeline.py`), the one a schedule runs: the pipeline before
it picked up what is new (a prompts source that grew: only its new prompts are answered and cached),
trained, evaluated and exported. Here the evaluation's macro tau is compared with the released draft's,
and the export is promoted only when it is higher by more than `release.margin`; otherwise the release
stays as it was and the decision says why, with both taus and the margin (`decide`). The two taus must
come from one protocol (`protocol`: the target, the algorithm and every `eval.*` setting): a released
draft measured another way is not compared, and the decision names what differs (a new protocol starts
its own release: another `release.dir`).

    <release.dir>/current               a symlink to the released draft's folder: servers load current/export
    <release.dir>/previous              the release it replaced (roll back: point current at it)
    <release.dir>/<name>/export/        the draft in the engines' layout, a copy of <run_dir>/export/<algo>/
    <release.dir>/<name>/draft/         the trained draft it came from (`release.init=released` starts there)
    <release.dir>/<name>/release.json   macro tau, protocol, weights sha256, MLflow model version, time

A promotion copies into a temporary folder, renames it to `<name>`, then swaps the `current` symlink by a
rename, so a reader sees the old release or the new one, never a mix; only `current` and `previous` are
kept. Then the registered model's alias (`release.alias`) moves to the export's version of
`deepspec-<target>-<algo>`. The decision is written to `<run_dir>/release-<algo>.json`, logged to MLflow
(`release/*` metrics, a tag on the model version) and shown on the flow run's page (artifact
`release-<algo>`). One release step at a time per `release.dir` (a lock).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from prefect import task
from prefect.cache_policies import NO_CACHE

from deepspec.models.errors import ConfigError, DeepSpecError
from deepspec.tasks import artifacts, files, tracking
from deepspec.tasks.evaluate.stage import RESULTS_FILE
from deepspec.tasks.paths import ReleasePaths, release_paths, run_paths, target_identity
from deepspec.tasks.processes import exclusive
from deepspec.tasks.results import ReleaseResult, to_record
from deepspec.tasks.train.stage import train_hash, trained_draft

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
LOCK_FILE = ".release.lock"
NAME = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")  # a release folder: when, and whose weights


def protocol(cfg: DictConfig) -> dict[str, Any]:
    """What a macro tau was measured with: the target, the algorithm and every `eval.*` setting."""
    return {
        "target": target_identity(cfg),
        "algo": str(cfg.algo.name),
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
    }


def protocol_differences(released: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: released value -> this run's` for every setting of the two protocols that differs."""
    a, b = _flat(released), _flat(now)
    return [
        f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        for key in sorted(a.keys() | b.keys())
        if a.get(key) != b.get(key)
    ]


def decide(candidate: dict[str, Any], released: dict[str, Any] | None, margin: float) -> tuple[bool, str]:
    """(promote?, why) for a candidate {tau, protocol, weights_sha256} against the released draft's record."""
    tau = candidate["tau"]
    if released is None:
        return True, f"no draft released yet: releasing this one (macro tau {tau:.4f})"
    old = released["tau"]
    if released["weights_sha256"] == candidate["weights_sha256"]:
        return False, f"this run's draft is the released one (macro tau {old:.4f}): nothing new to release"
    differences = protocol_differences(released["protocol"], candidate["protocol"])
    if differences:
        return False, (
            f"the released draft (macro tau {old:.4f}) was evaluated under another protocol than this "
            f"run's (macro tau {tau:.4f}), so they are not compared: {'; '.join(differences)}. Keep the "
            "protocol, or release under the new one into another release.dir"
        )
    if tau > old + margin:
        gain = f"by {tau - old:.4f}, more than the margin {margin}"
        return True, f"macro tau {tau:.4f} beats the released {old:.4f} {gain}"
    return False, (
        f"macro tau {tau:.4f} does not beat the released {old:.4f} by more than the margin {margin} "
        f"(it needed above {old + margin:.4f}); the release stays"
    )


def released_record(release: ReleasePaths) -> dict[str, Any] | None:
    """The released draft's `release.json`, or None when nothing is released there yet."""
    if not release.record.is_file():
        return None
    return json.loads(release.record.read_text(encoding="utf-8"))


def release(cfg: DictConfig) -> ReleaseResult:
    """Compare this run's evaluated export with the released draft; promote it when it is better by the
    margin. Writes the decision to `<run_dir>/release-<algo>.json` and returns it."""
    where = release_paths(cfg)
    if where is None:
        raise ConfigError("release.dir is null: the release step needs the folder to release into")
    paths = run_paths(cfg)
    export = files.read_done(paths.export_dir, train_hash(cfg))
    if export is None:
        raise DeepSpecError(
            f"release: no export of this run's draft in {paths.export_dir}; run the pipeline first"
        )
    results = json.loads((paths.eval_dir / RESULTS_FILE).read_text(encoding="utf-8"))
    if results["draft_sha256"] != export["weights_sha256"]:
        raise DeepSpecError(
            f"release: {paths.eval_dir / RESULTS_FILE} evaluated another draft than the one exported to "
            f"{paths.export_dir}; run the evaluate stage again"
        )
    margin = float(cfg.release.margin)
    candidate = {
        "tau": float(results["macro"]["tau"]),
        "protocol": protocol(cfg),
        "weights_sha256": export["weights_sha256"],
    }
    version = tracking.model_version_of(cfg, export["weights_sha256"])
    with exclusive(where.root / LOCK_FILE, f"the release step for {where.root}"):
        released = released_record(where)
        promoted, reason = decide(candidate, released, margin)
        if promoted:
            record = {
                **candidate,
                "target": str(cfg.target.name),
                "algo": str(cfg.algo.name),
                "model": tracking.model_name(cfg),
                "model_version": version,
                "mlflow_run_id": tracking.run_id(cfg),
                "run_dir": str(Path(cfg.run_dir).resolve()),
                "released_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            promote(where, paths.export_dir, trained_draft(cfg, "release").parent, record)
            if version is None:
                log.warning("release: this export has no version of %s in MLflow's registry; the alias %r "
                            "stays where it was", tracking.model_name(cfg), cfg.release.alias)  # fmt: skip
        is_released = released is not None and released["weights_sha256"] == candidate["weights_sha256"]
        if version is not None and (promoted or is_released):  # again when released: a failure may have
            tracking.set_model_alias(cfg, str(cfg.release.alias), version)  # come between swap and alias
    result = ReleaseResult(
        promoted=promoted,
        reason=reason,
        candidate_tau=candidate["tau"],
        released_tau=None if released is None else float(released["tau"]),
        margin=margin,
        release=str(where.current.resolve()) if where.current.exists() else "",
        model_version=version,
    )
    files.atomic_write_text(
        paths.run_dir / f"release-{paths.algo}.json", json.dumps(to_record(result), indent=2)
    )
    log.info("release: %s: %s", "promoted" if promoted else "kept the release", reason)
    metrics = {"release/promoted": float(promoted), "release/candidate_tau": result.candidate_tau}
    if result.released_tau is not None:
        metrics["release/released_tau"] = result.released_tau
    tracking.log_metrics(cfg, metrics)
    if version is not None:
        tracking.tag_model_version(
            cfg, version, {"release": ("promoted: " if promoted else "refused: ") + reason}
        )
    return result


def promote(where: ReleasePaths, export_dir: Path, draft_dir: Path, record: dict[str, Any]) -> Path:
    """Copy the export and its trained draft into a new release folder, then swap `current` to it
    (`previous` to the one it replaced); remove older releases. Returns the new folder."""
    root = where.root
    root.mkdir(parents=True, exist_ok=True)
    name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{record['weights_sha256'][:8]}"
    staging = root / f"{TMP_PREFIX}{name}"
    shutil.rmtree(staging, ignore_errors=True)
    skip = shutil.ignore_patterns(files.DONE_FILE)  # the run's stage records; not part of a release
    shutil.copytree(export_dir, staging / "export", ignore=skip)
    shutil.copytree(draft_dir, staging / "draft", ignore=skip)
    files.atomic_write_text(staging / where.record.name, json.dumps(record, indent=2))
    staging.rename(root / name)
    replaced = os.readlink(where.current) if where.current.is_symlink() else None
    if replaced is not None:
        _point(where.previous, replaced)
    _point(where.current, name)  # the promotion: one rename
    keep = {name, replaced}
    for child in root.iterdir():
        stale = NAME.fullmatch(child.name) or child.name.startswith(TMP_PREFIX)
        if stale and child.name not in keep and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
    log.info("release: %s -> %s (macro tau %.4f)", where.current, name, record["tau"])
    return root / name


def _point(link: Path, target: str) -> None:
    """Make `link` a symlink to `target` (a sibling's name) by renaming a new link over it: atomic."""
    fresh = link.with_name(f"{TMP_PREFIX}{link.name}")
    fresh.unlink(missing_ok=True)
    os.symlink(target, fresh)
    os.replace(fresh, link)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in flat.items()}


def markdown(result: ReleaseResult) -> str:
    """The decision as the flow run's artifact shows it."""
    released = "none" if result.released_tau is None else f"{result.released_tau:.4f}"
    rows = [
        ("decision", "promoted" if result.promoted else "kept the release"),
        ("this run's macro tau", f"{result.candidate_tau:.4f}"),
        ("released macro tau (before)", released),
        ("margin", f"{result.margin}"),
        ("release", f"`{result.release}`" if result.release else "none"),
        ("MLflow model version", result.model_version or "not registered"),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"### Release\n\n{result.reason}\n\n| | |\n| --- | --- |\n{table}\n"


@task(name="release", cache_policy=NO_CACHE)
def release_task(cfg: DictConfig) -> ReleaseResult:
    """The stage, plus its decision and the MLflow run as a markdown artifact (`release-<algo>`) on the
    flow run's page in the Prefect UI."""
    result = release(cfg)
    artifacts.publish(cfg, "release", result, f"{markdown(result)}\n{artifacts.mlflow_line(cfg)}\n")
    return result
