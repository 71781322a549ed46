"""Secrets: S3 keys and API keys are named in the configuration, never written into it.

A secret reaches DeepSpec in one of two ways, neither of which puts its value in the configuration:
- from the environment a client reads itself: s3fs (botocore) reads AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN; the OpenAI-compatible backend reads the variable
  `regen.api_key_env` names ($OPENAI_API_KEY);
- as a reference in `storage.storage_options`: `${oc.env:VAR}` (an environment variable) or
  `${prefect_secret:BLOCK}` (a Prefect Secret block, read from the Prefect API the flow runs against):

      deepspec cache storage=s3 storage.url=s3://bucket/run1 '+storage.storage_options.key=${oc.env:S3_KEY}' \
          '+storage.storage_options.secret=${prefect_secret:s3-secret}'

`compose` keeps such references as text (`hold_references`, `restore_references`), so the composed config
and all that is made from it (launch.yaml, the draft's config.yaml, MLflow params, config hashes, Prefect's
serialisation of it as a subflow's parameter) hold `${prefect_secret:s3-secret}`, never the value, and a
rotated key changes no hash. (`${oc.env:..}` elsewhere, e.g. in a path, resolves as usual.) The one reader is
`resolve_options`, which the cache's `open_fs` calls as it hands the options to fsspec, in whatever
process opens the cache: torchrun ranks too, which inherit the environment and the Prefect API
(`child_env`). A literal value at a secret's key (key, secret, token, password, api_key, ...; `SECRET_KEY`)
fails `compose`, naming the key and both ways, before a flow run records it as a parameter.

`redact` is the rule for whatever writes a configuration out (`save_config`; MLflow params): a
secret-named key keeps its reference or reads `***`, and a value a reference produced in this process is
masked wherever it appears.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from deepspec.models.errors import ConfigError

MASK = "***"
OPTIONS = "storage.storage_options"  # the one section whose references are resolved, at use (`open_fs`)
# fsspec's and cloud SDKs' names for credentials: s3fs key/secret/token, botocore aws_*_key*, adlfs
# account_key/sas_token/connection_string, generic password/api_key. Exact names, not substrings, so that
# regen.api_key_env (a variable's name) and target.mask_token_id are not secrets.
SECRET_KEY = re.compile(
    r"(?:key|(?:.*_)?(?:secret|token|password|passwd|api_key|apikey|access_key|access_key_id|secret_key|"
    r"secret_access_key|session_token|account_key|sas_token|connection_string|credentials?))",
    re.IGNORECASE,
)
NOT_SECRET = {"anon", "google_default", "cloud", "browser"}  # gcsfs `token` methods, not credentials
_REFERENCE = re.compile(r"\$\{\s*(oc\.env|prefect_secret)\s*:")
_URL_PASSWORD = re.compile(r"://[^/\s@:]+:[^/\s@]+@")  # scheme://user:password@host
_PRODUCED: set[str] = set()  # values references resolved to in this process, masked by `redact`
_BLOCKS: dict[str, Any] = {}  # Prefect Secret blocks already read by this process


def _prefect_secret(name: str) -> Any:
    """The resolver `${prefect_secret:NAME}`: the value of the Prefect Secret block NAME."""
    if name not in _BLOCKS:
        from prefect.blocks.system import Secret
        from prefect.settings import PREFECT_API_URL

        try:  # _sync: the blocking call even where an event loop runs (Prefect dispatches on context)
            _BLOCKS[name] = Secret.load(name, _sync=True).get()
        except ValueError as err:
            where = PREFECT_API_URL.value() or "Prefect's temporary server (PREFECT_API_URL is unset)"
            raise ConfigError(
                f"${{prefect_secret:{name}}}: no Prefect Secret block named {name!r} at {where}; create it "
                f"with `prefect block create secret` or Secret(value=...).save({name!r})"
            ) from err
    return _BLOCKS[name]


if not OmegaConf.has_resolver("prefect_secret"):
    OmegaConf.register_new_resolver("prefect_secret", _prefect_secret, use_cache=False)


def is_secret_key(name: Any) -> bool:
    return isinstance(name, str) and SECRET_KEY.fullmatch(name) is not None


def is_literal_secret(key: Any, value: Any) -> bool:
    """Whether `value` at `key` is a secret given as its value (neither empty nor a reference)."""
    if not is_secret_key(key) or value is None or value == "" or is_reference(value):
        return False
    return not (isinstance(value, str) and value in NOT_SECRET)


def is_reference(value: Any) -> bool:
    """Whether `value` is text naming a secret (`${oc.env:..}`, `${prefect_secret:..}`, held or live)."""
    return isinstance(value, str) and _REFERENCE.search(value) is not None


def _leaves(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        return [leaf for key, value in tree.items() for leaf in _leaves(value, f"{path}.{key}".lstrip("."))]
    if isinstance(tree, list):
        return [leaf for i, value in enumerate(tree) for leaf in _leaves(value, f"{path}[{i}]")]
    return [(path, tree)]


def _literal(path: str) -> str:
    """The problem of a secret given as a value at `path`: where it would end up, and the ways to pass it."""
    if not path.startswith(f"{OPTIONS}."):
        return (
            f"{path}: a secret's value in the configuration would be saved with the run; secrets come from "
            "the environment (AWS_* for S3, the variable regen.api_key_env names for an API key) or from "
            f"references in {OPTIONS} (${{oc.env:VAR}}, ${{prefect_secret:BLOCK}})"
        )
    message = (
        f"{path}: a secret's value in the configuration would be saved with the run (flow-run parameters, "
        f"launch.yaml, MLflow); pass a reference instead: '+{path}=${{oc.env:VAR}}' (an environment "
        f"variable) or '+{path}=${{prefect_secret:BLOCK}}' (a Prefect Secret block)"
    )
    if path.rpartition(".")[2] in ("key", "secret", "token"):
        message += ", or leave it out: s3fs reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY itself"
    return message


def hold_references(cfg: DictConfig) -> tuple[dict[str, str], list[str]]:
    """Before `OmegaConf.resolve`: take the references out of `cfg.storage.storage_options` (set to None
    meanwhile, so nothing reads a secret while composing) and return them, {path: text}, with every
    secret given as a literal value, and every reference outside that section, as problems."""
    held, problems = {}, []
    raw = OmegaConf.to_container(cfg, resolve=False)  # interpolations as their text; nothing is read
    for path, value in _leaves(raw):
        in_options = path.startswith(f"{OPTIONS}.")
        key = path.rpartition(".")[2].partition("[")[0]
        if is_reference(value):
            if in_options:
                held[path] = value
            elif "prefect_secret" in value or is_secret_key(key):  # it would be resolved into the config
                problems.append(
                    f"{path}: secret references are read only in {OPTIONS}; elsewhere a secret comes from "
                    "the environment (AWS_* for S3, the variable regen.api_key_env names for an API key)"
                )
        elif is_literal_secret(key, value):
            problems.append(_literal(path))
        elif isinstance(value, str) and _URL_PASSWORD.search(value):
            problems.append(
                f"{path}: a password in a URL (user:password@) would be saved with the run; give it to "
                "the client through its environment (e.g. MLFLOW_TRACKING_PASSWORD) instead"
            )
    for path in held:
        OmegaConf.update(cfg, path, None, force_add=True)
    return held, problems


def restore_references(cfg: DictConfig, held: dict[str, str]) -> None:
    """After `OmegaConf.resolve`: put the held references back, escaped (`\\${...}`), so that OmegaConf
    reads them as text: resolving, saving, loading and Prefect's serialisation leave them as they are."""
    for path, text in held.items():
        OmegaConf.update(cfg, path, text.replace("${", "\\${"), force_add=True)


def scrub(message: str, overrides: list[str]) -> str:
    """`message` (Hydra's, which echoes overrides) with the values of secret-named overrides masked."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and value and is_secret_key(key.rpartition(".")[2]) and not is_reference(value):
            message = message.replace(value, MASK)
    return message


def resolve_options(options: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    """fsspec storage options with every reference replaced by the value it names: for the filesystem
    only, never to be logged or saved."""
    if isinstance(options, DictConfig):
        options = OmegaConf.to_container(options, resolve=True)
    return {key: _resolved(value, key) for key, value in (options or {}).items()}


def _resolved(value: Any, path: str) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {key: _resolved(v, f"{path}.{key}") for key, v in value.items()}
    if isinstance(value, list):
        return [_resolved(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if not is_reference(value):
        return value
    text = value.replace("\\${", "${")
    try:
        resolved = OmegaConf.create({"value": text}).value
    except OmegaConfBaseException as err:  # a missing variable, or the block's ConfigError inside
        if isinstance(err.__cause__, ConfigError):
            raise ConfigError(f"{OPTIONS}.{path}: {err.__cause__}") from err
        reason = str(getattr(err, "msg", None) or err).splitlines()[0]
        raise ConfigError(f"{OPTIONS}.{path}={text}: {reason}") from err
    if isinstance(resolved, str) and len(resolved) >= 4:  # shorter ones would mask ordinary text
        _PRODUCED.add(resolved)
    return resolved


def redact(tree: Any, key: Any = None) -> Any:
    """A copy of a plain tree (dicts, lists, scalars) safe to write out: a secret-named key's value is
    kept only when it is a reference, and any value a reference produced is masked wherever it occurs."""
    if is_literal_secret(key, tree):
        return MASK
    if isinstance(tree, Mapping):
        return {k: redact(v, k) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [redact(v) for v in tree]
    if isinstance(tree, str):
        for produced in _PRODUCED:
            tree = tree.replace(produced, MASK)
    return tree


def redacted_params(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as a plain tree, redacted: what MLflow records as the run's params."""
    return redact(OmegaConf.to_container(cfg, resolve=True))


def save_config(cfg: DictConfig, path: Path) -> None:
    """`OmegaConf.save`, redacted; held references stay escaped, so a process loading the file (a
    torchrun rank) reads them as references and resolves them itself."""
    OmegaConf.save(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=False))), path)


def child_env() -> dict[str, str]:
    """What a child process (a torchrun rank) needs, beyond the environment it inherits, to resolve
    references as this one does: the Prefect API this process talks to, when set only in Prefect's
    settings (a profile, `temporary_settings`) rather than in the environment."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return {"PREFECT_API_URL": str(url)} if url else {}
