"""Secrets in the configuration (`tasks/secrets.py`): references stay references wherever the config goes,
a literal secret is refused before anything records it, and redaction masks what a reference produced.
Each planted value is searched for in what would be written; the last tests show the leak the holding
of references prevents. (`tests/flows/test_secrets.py` searches every output of a whole run.)"""

from __future__ import annotations

import uuid

import pytest
from omegaconf import OmegaConf

from deepspec.models.errors import ConfigError
from deepspec.tasks import secrets
from deepspec.tasks.config import compose, config_hash

S3 = [
    "storage=s3",
    "storage.url=s3://bucket/run1",
    "+storage.storage_options.endpoint_url=http://127.0.0.1:9",
]


@pytest.fixture
def planted(monkeypatch) -> str:
    """A secret in the environment variable DEEPSPEC_TEST_SECRET, unlike any other text."""
    value = f"planted-{uuid.uuid4().hex}"
    monkeypatch.setenv("DEEPSPEC_TEST_SECRET", value)
    return value


def referenced(*extra: str):
    return compose([*S3, "+storage.storage_options.secret=${oc.env:DEEPSPEC_TEST_SECRET}", *extra])


@pytest.mark.parametrize(
    "override, key",
    [
        ("+storage.storage_options.secret=PLANTED", "storage.storage_options.secret"),
        ("+storage.storage_options.client_kwargs={aws_session_token:PLANTED}",
         "storage.storage_options.client_kwargs.aws_session_token"),
        ("+regen.extra_body.api_key=PLANTED", "regen.extra_body.api_key"),
    ],
)  # fmt: skip
def test_a_literal_secret_is_refused_naming_the_key_and_both_ways(override, key):
    with pytest.raises(ConfigError) as err:
        compose([*S3, override])
    message = str(err.value)
    assert key in message and "PLANTED" not in message
    assert "${oc.env:VAR}" in message and "${prefect_secret:BLOCK}" in message


def test_hydras_own_errors_do_not_echo_a_secret():
    """Without the `+`, Hydra refuses the key and repeats the override: the value is masked."""
    with pytest.raises(ConfigError, match="storage.storage_options.secret") as err:
        compose([*S3, "storage.storage_options.secret=PLANTED"])
    assert "PLANTED" not in str(err.value)


def test_a_password_in_a_url_and_a_block_outside_the_storage_options_are_refused():
    with pytest.raises(ConfigError, match="2 problems") as err:
        compose(
            ["tracking.uri=http://user:PLANTED@127.0.0.1:5000", "+regen.extra_body.x=${prefect_secret:b}"]
        )
    message = str(err.value)
    assert "tracking.uri" in message and "regen.extra_body.x" in message and "PLANTED" not in message


def test_non_secret_values_at_secret_like_keys_compose():
    """gcsfs's token methods, and an environment variable's name (`regen.api_key_env`), are no secrets."""
    cfg = compose([*S3, "+storage.storage_options.token=anon", "regen.api_key_env=OPENAI_API_KEY"])
    assert cfg.storage.storage_options.token == "anon"


def test_references_stay_references_wherever_the_config_goes(planted, tmp_path):
    from prefect import flow

    cfg = referenced("+storage.storage_options.key=${prefect_secret:s3-key}")
    options = cfg.storage.storage_options
    assert options.secret == "${oc.env:DEEPSPEC_TEST_SECRET}" and options.key == "${prefect_secret:s3-key}"
    written = {
        "yaml": OmegaConf.to_yaml(cfg, resolve=True),
        "container": str(OmegaConf.to_container(cfg, resolve=True)),
        "mlflow params": str(secrets.redacted_params(cfg)),
        "prefect parameters": str(flow(lambda storage: None).serialize_parameters({"storage": cfg.storage})),
    }
    secrets.save_config(cfg, tmp_path / "launch.yaml")
    written["launch.yaml"] = (tmp_path / "launch.yaml").read_text()
    assert {where: planted in text for where, text in written.items()} == dict.fromkeys(written, False)
    assert "${prefect_secret:s3-key}" in written["prefect parameters"]
    # a rank loads launch.yaml: the same references, the same hash, and the value when it opens the cache
    loaded = OmegaConf.load(tmp_path / "launch.yaml")
    assert config_hash(loaded.storage) == config_hash(cfg.storage)
    resolved = secrets.resolve_options({"secret": loaded.storage.storage_options.secret})
    assert resolved == {"secret": planted}


def test_the_hash_names_the_reference_not_the_value(planted, monkeypatch):
    before = config_hash(referenced().storage)
    monkeypatch.setenv("DEEPSPEC_TEST_SECRET", "rotated")
    assert config_hash(referenced().storage) == before  # a rotated key keeps the cache and the draft


def test_saving_a_config_without_secrets_writes_what_omegaconf_writes(tmp_path):
    cfg = compose(S3)
    secrets.save_config(cfg, tmp_path / "redacted.yaml")
    OmegaConf.save(cfg, tmp_path / "plain.yaml")
    assert (tmp_path / "redacted.yaml").read_text() == (tmp_path / "plain.yaml").read_text()


def test_redaction_masks_secret_keys_and_every_value_a_reference_produced(planted):
    secrets.resolve_options({"secret": "${oc.env:DEEPSPEC_TEST_SECRET}"})  # the filesystem read it
    tree = {
        "storage_options": {"key": "AKIALITERAL", "secret": "${prefect_secret:s3}", "token": "anon"},
        "regen": {"api_key_env": "OPENAI_API_KEY", "credentials": {"user": "u"}},
        "note": f"failed with secret {planted} at 127.0.0.1",
    }
    assert secrets.redact(tree) == {
        "storage_options": {"key": "***", "secret": "${prefect_secret:s3}", "token": "anon"},
        "regen": {"api_key_env": "OPENAI_API_KEY", "credentials": "***"},
        "note": "failed with secret *** at 127.0.0.1",
    }


def test_an_unset_variable_is_named_where_the_options_are_read(monkeypatch):
    monkeypatch.delenv("DEEPSPEC_TEST_UNSET", raising=False)
    with pytest.raises(
        ConfigError, match=r"storage_options\.client_kwargs\.aws_secret_access_key.*DEEPSPEC_TEST_UNSET"
    ):
        secrets.resolve_options({"client_kwargs": {"aws_secret_access_key": "${oc.env:DEEPSPEC_TEST_UNSET}"}})


def test_a_live_reference_leaks_into_prefect_parameters_and_params(planted):
    """What holding prevents: a config whose reference OmegaConf resolves on access puts the value into
    Prefect's record of a subflow's parameters and into the resolved params, where the searches look."""
    from prefect import flow

    live = OmegaConf.create({"storage_options": {"secret": "${oc.env:DEEPSPEC_TEST_SECRET}"}})
    assert planted in str(flow(lambda storage: None).serialize_parameters({"storage": live}))
    assert planted in str(OmegaConf.to_container(live, resolve=True))


def test_redaction_catches_a_literal_that_bypassed_compose(planted, tmp_path):
    """A config built without `compose` (a script's OmegaConf.create) holding a literal: saving masks it."""
    raw = OmegaConf.create({"storage": {"storage_options": {"secret": planted}}})
    secrets.save_config(raw, tmp_path / "config.yaml")
    assert planted not in (tmp_path / "config.yaml").read_text()
