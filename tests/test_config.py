"""Tests for telemetry.config: precedence, parsing, validation and masking of the token."""

from __future__ import annotations

import math
import pathlib
import re
from typing import Any

import pytest

from telemetry.config import (
    TelemetryConfig,
    default_data_dir,
    mask_url,
    parse_bool,
    resolve_config,
    url_secrets,
)
from telemetry.errors import ConfigError, TelemetryError

TOKEN = "tok-5ecret-8f2c41d9"  # distinctive, so a leak shows up as a substring
DEFAULTS = {
    "enabled": True,
    "api_url": None,
    "api_token": None,
    "api_enabled": True,
    "max_retries": 3,
    "timeout": 10.0,
    "durability": "fsync",
    "batch_interval": 1.0,
    "end_run_timeout": 3.0,
    "retry_after_max": 30.0,
    "otel": False,
}
TRUE_WORDS = ["1", "true", "yes", "on"]
FALSE_WORDS = ["0", "false", "no", "off"]


@pytest.fixture
def home(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Point HOME at an empty temporary directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


# --- precedence ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), DEFAULTS.items())
def test_default_value(name: str, expected: Any, home: pathlib.Path) -> None:
    """With no argument and no environment variable, each setting has its default."""
    config = TelemetryConfig(environ={})

    assert getattr(config, name) == expected
    assert config.sources[name] == "default"


@pytest.mark.parametrize(
    ("name", "argument", "env_text", "from_argument", "from_env"),
    [
        ("enabled", False, "yes", False, True),
        ("data_dir", "/srv/arg", "/srv/env", pathlib.Path("/srv/arg"), pathlib.Path("/srv/env")),
        ("ndjson_dir", "/j/arg", "/j/env", pathlib.Path("/j/arg"), pathlib.Path("/j/env")),
        ("db_path", "/d/arg.db", "/d/env.db", pathlib.Path("/d/arg.db"), pathlib.Path("/d/env.db")),
        (
            "api_url",
            "http://127.0.0.1:1/a",
            "http://127.0.0.1:2/e",
            "http://127.0.0.1:1/a",
            "http://127.0.0.1:2/e",
        ),
        ("api_token", "arg-token", "env-token", "arg-token", "env-token"),
        ("api_enabled", True, "off", True, False),
        ("max_retries", 5, "7", 5, 7),
        ("timeout", 2.5, "4", 2.5, 4.0),
        ("durability", "none", "batch", "none", "batch"),
        ("batch_interval", 0.5, "0.25", 0.5, 0.25),
        ("end_run_timeout", 0, "1.5", 0.0, 1.5),
        ("retry_after_max", 60, "90", 60.0, 90.0),
        ("otel", True, "off", True, False),
    ],
)
def test_precedence(
    name: str, argument: Any, env_text: str, from_argument: Any, from_env: Any
) -> None:
    """An argument beats the environment, which beats the default, for each setting."""
    environ = {"TELEMETRY_" + name.upper(): env_text}

    with_both = TelemetryConfig(**{name: argument}, environ=environ)
    env_only = TelemetryConfig(environ=environ)

    assert getattr(with_both, name) == from_argument
    assert with_both.sources[name] == "argument"
    assert getattr(env_only, name) == from_env
    assert env_only.sources[name] == "environment"


def test_precedence_per_key() -> None:
    """Each setting takes its own source, so one config can mix all three."""
    config = TelemetryConfig(
        max_retries=1, environ={"TELEMETRY_MAX_RETRIES": "2", "TELEMETRY_TIMEOUT": "4"}
    )

    assert config.max_retries == 1
    assert config.timeout == 4.0
    assert config.batch_interval == 1.0
    assert config.sources["max_retries"] == "argument"
    assert config.sources["timeout"] == "environment"
    assert config.sources["batch_interval"] == "default"


def test_argument_none_not_given() -> None:
    """An argument of None counts as not given, so the environment applies."""
    config = TelemetryConfig(timeout=None, environ={"TELEMETRY_TIMEOUT": "4"})

    assert config.timeout == 4.0
    assert config.sources["timeout"] == "environment"


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_env_is_unset(text: str) -> None:
    """An empty or blank environment variable counts as unset, so the default applies."""
    config = TelemetryConfig(
        environ={"TELEMETRY_ENABLED": text, "TELEMETRY_TIMEOUT": text, "TELEMETRY_API_URL": text}
    )

    assert config.enabled is True
    assert config.timeout == 10.0
    assert config.api_url is None
    assert config.sources["enabled"] == "default"


def test_env_values_stripped() -> None:
    """Spaces around environment values are ignored."""
    config = TelemetryConfig(
        environ={
            "TELEMETRY_MAX_RETRIES": " 2 ",
            "TELEMETRY_DURABILITY": " Batch ",
            "TELEMETRY_API_TOKEN": f" {TOKEN}\n",
        }
    )

    assert config.max_retries == 2
    assert config.durability == "batch"
    assert config.api_token == TOKEN


def test_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without environ=, the settings come from os.environ."""
    monkeypatch.setenv("TELEMETRY_MAX_RETRIES", "6")

    config = TelemetryConfig()

    assert config.max_retries == 6
    assert config.sources["max_retries"] == "environment"


# --- paths --------------------------------------------------------------------------------


def test_data_dir_from_xdg(home: pathlib.Path) -> None:
    """An absolute XDG_DATA_HOME is the parent directory of the store."""
    config = TelemetryConfig(environ={"XDG_DATA_HOME": "/xdg/data"})

    assert config.data_dir == pathlib.Path("/xdg/data/agent-telemetry")


@pytest.mark.parametrize("xdg", ["relative/data", "", None])
def test_data_dir_default(xdg: str | None, home: pathlib.Path) -> None:
    """A missing, empty or relative XDG_DATA_HOME is ignored for ~/.local/share."""
    environ = {} if xdg is None else {"XDG_DATA_HOME": xdg}

    config = TelemetryConfig(environ=environ)

    assert config.data_dir == home / ".local" / "share" / "agent-telemetry"
    assert config.sources["data_dir"] == "default"


def test_default_data_dir_function(home: pathlib.Path) -> None:
    """default_data_dir follows the same rules as the config."""
    assert default_data_dir({"XDG_DATA_HOME": "/x"}) == pathlib.Path("/x/agent-telemetry")
    assert default_data_dir({"XDG_DATA_HOME": "x"}) == home / ".local/share/agent-telemetry"


def test_paths_derived_from_data_dir() -> None:
    """ndjson_dir and db_path default to the journal and telemetry.db under data_dir."""
    config = TelemetryConfig(data_dir="/srv/telemetry", environ={})

    assert config.ndjson_dir == pathlib.Path("/srv/telemetry/journal")
    assert config.db_path == pathlib.Path("/srv/telemetry/telemetry.db")


def test_paths_derived_from_env_data_dir() -> None:
    """A data_dir from the environment moves the derived paths with it."""
    config = TelemetryConfig(environ={"TELEMETRY_DATA_DIR": "/env/dir"})

    assert config.ndjson_dir == pathlib.Path("/env/dir/journal")
    assert config.db_path == pathlib.Path("/env/dir/telemetry.db")


def test_paths_set_explicitly() -> None:
    """An explicit ndjson_dir or db_path is kept, whatever data_dir is."""
    config = TelemetryConfig(
        data_dir="/a", ndjson_dir="/b/journal", db_path=pathlib.Path("/c/x.db"), environ={}
    )

    assert config.ndjson_dir == pathlib.Path("/b/journal")
    assert config.db_path == pathlib.Path("/c/x.db")


def test_path_expands_user(home: pathlib.Path) -> None:
    """A leading ~ in a path is expanded to the home directory."""
    config = TelemetryConfig(environ={"TELEMETRY_DATA_DIR": "~/telemetry"})

    assert config.data_dir == home / "telemetry"


@pytest.mark.parametrize("value", [" ", 5])
def test_path_invalid(value: Any) -> None:
    """A blank or non-path data_dir raises ConfigError naming the key."""
    with pytest.raises(ConfigError, match="invalid data_dir="):
        TelemetryConfig(data_dir=value, environ={})


# --- booleans -----------------------------------------------------------------------------


def _spellings(word: str) -> list[str]:
    return [word, word.upper(), word.capitalize(), f"  {word}\t", f"\n{word.upper()} "]


@pytest.mark.parametrize("text", [s for word in TRUE_WORDS for s in _spellings(word)])
def test_bool_true_words(text: str) -> None:
    """Each true word, in any case and with spaces around it, parses as True."""
    assert parse_bool(text, "TELEMETRY_ENABLED") is True
    assert TelemetryConfig(environ={"TELEMETRY_API_ENABLED": text}).api_enabled is True


@pytest.mark.parametrize("text", [s for word in FALSE_WORDS for s in _spellings(word)])
def test_bool_false_words(text: str) -> None:
    """Each false word, in any case and with spaces around it, parses as False."""
    assert parse_bool(text, "TELEMETRY_ENABLED") is False
    assert TelemetryConfig(environ={"TELEMETRY_ENABLED": text}).enabled is False


@pytest.mark.parametrize("text", ["maybe", "2", "", "y", "truthy", "o n", "-1"])
def test_bool_invalid_word(text: str) -> None:
    """Any other word raises ConfigError naming the key and the value."""
    with pytest.raises(ConfigError, match=f"invalid TELEMETRY_ENABLED={text!r}") as caught:
        parse_bool(text, "TELEMETRY_ENABLED")

    assert caught.value.key == "TELEMETRY_ENABLED"
    assert caught.value.value == text


@pytest.mark.parametrize("text", ["maybe", "2"])
def test_bool_invalid_env(text: str) -> None:
    """An invalid word in the environment raises ConfigError naming the variable and value."""
    with pytest.raises(ConfigError, match=f"invalid TELEMETRY_ENABLED={text!r}"):
        TelemetryConfig(environ={"TELEMETRY_ENABLED": text})


@pytest.mark.parametrize("value", ["", "maybe", 1, 0.0])
def test_bool_invalid_argument(value: Any) -> None:
    """An invalid enabled argument raises ConfigError naming the argument."""
    with pytest.raises(ConfigError, match="invalid enabled="):
        TelemetryConfig(enabled=value, environ={})


def test_bool_message_lists_words() -> None:
    """The error lists every accepted word."""
    with pytest.raises(ConfigError) as caught:
        parse_bool("maybe", "TELEMETRY_ENABLED")

    for word in TRUE_WORDS + FALSE_WORDS:
        assert word in caught.value.expected


# --- parsing errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env_key", "text"),
    [
        ("TELEMETRY_MAX_RETRIES", "three"),
        ("TELEMETRY_MAX_RETRIES", "3.0"),
        ("TELEMETRY_TIMEOUT", "10s"),
        ("TELEMETRY_DURABILITY", "sometimes"),
        ("TELEMETRY_BATCH_INTERVAL", "soon"),
    ],
)
def test_invalid_env_text(env_key: str, text: str) -> None:
    """Unparsable environment text raises ConfigError naming the variable and the value."""
    with pytest.raises(ConfigError, match=f"invalid {env_key}={text!r}"):
        TelemetryConfig(environ={env_key: text})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_retries", True),
        ("max_retries", 2.5),
        ("timeout", False),
        ("timeout", [1]),
        ("durability", "sometimes"),
        ("durability", 1),
        ("api_url", 5),
    ],
)
def test_invalid_argument(name: str, value: Any) -> None:
    """An argument of the wrong type or value raises ConfigError naming the argument."""
    with pytest.raises(ConfigError, match=f"invalid {name}=") as caught:
        TelemetryConfig(**{name: value}, environ={})

    assert caught.value.value == value


def test_durability_any_case() -> None:
    """Durability modes are matched without case."""
    assert TelemetryConfig(durability="FSYNC", environ={}).durability == "fsync"


# --- validate() ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("max_retries", -1, "from 0 to 10"),
        ("max_retries", 11, "from 0 to 10"),
        ("timeout", 0, "positive number of seconds"),
        ("timeout", -1, "positive number of seconds"),
        ("timeout", math.nan, "positive number of seconds"),
        ("timeout", math.inf, "positive number of seconds"),
        ("batch_interval", 0, "positive number of seconds"),
        ("retry_after_max", -0.5, "positive number of seconds"),
        ("end_run_timeout", -1, "zero or a positive number"),
        ("end_run_timeout", math.inf, "zero or a positive number"),
        ("api_url", "127.0.0.1:8080/runs", "http:// or https:// URL"),
        ("api_url", "ftp://127.0.0.1/runs", "http:// or https:// URL"),
        ("api_url", "http:///runs", "http:// or https:// URL"),
    ],
)
def test_validate_rejects(name: str, value: Any, expected: str) -> None:
    """validate() raises ConfigError with the key, the value and what is expected."""
    config = TelemetryConfig(**{name: value}, environ={})

    with pytest.raises(ConfigError, match=expected) as caught:
        config.validate()

    assert caught.value.key == name
    assert str(caught.value).startswith(f"invalid {name}=")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_retries", 0),
        ("max_retries", 10),
        ("timeout", 0.001),
        ("end_run_timeout", 0),
        ("api_url", "http://127.0.0.1:8080/runs"),
        ("api_url", "https://127.0.0.1/runs"),
    ],
)
def test_validate_accepts(name: str, value: Any) -> None:
    """Values at the edges of their ranges pass, and validate() returns the config."""
    config = TelemetryConfig(**{name: value}, environ={})

    assert config.validate() is config


def test_validate_names_env_key() -> None:
    """A value from the environment is reported under its environment variable."""
    config = TelemetryConfig(environ={"TELEMETRY_MAX_RETRIES": "11"})

    with pytest.raises(ConfigError, match="invalid TELEMETRY_MAX_RETRIES=11") as caught:
        config.validate()

    assert caught.value.key == "TELEMETRY_MAX_RETRIES"


@pytest.mark.parametrize("character", ["\n", "\r", "\0", "\t", " ", "é", "\x7f"])
def test_validate_token_masked(character: str) -> None:
    """A token that does not fit an HTTP header is rejected, and the message masks it."""
    config = TelemetryConfig(api_token=TOKEN + character + TOKEN, environ={})

    with pytest.raises(ConfigError, match=re.escape("invalid api_token='***'")) as caught:
        config.validate()

    assert caught.value.key == "api_token"
    assert TOKEN not in str(caught.value)
    assert TOKEN not in repr(caught.value)
    assert TOKEN not in repr(caught.value.value)


def test_validate_token_accepts() -> None:
    """A token of visible ASCII characters passes, including base64 and JWT punctuation."""
    token = "eyJhbGciOi.J9-_~+/=abc.XYZ!#$%&'*^`|"

    assert TelemetryConfig(api_token=token, environ={}).validate().api_token == token


def test_validate_env_token_masked() -> None:
    """A bad token from the environment names TELEMETRY_API_TOKEN and masks the token."""
    config = TelemetryConfig(environ={"TELEMETRY_API_TOKEN": f"{TOKEN}\n{TOKEN}"})

    with pytest.raises(ConfigError, match="TELEMETRY_API_TOKEN") as caught:
        config.validate()

    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize("token", [TOKEN.encode(), [TOKEN]], ids=["bytes", "list"])
def test_parse_error_token_masked(token: Any) -> None:
    """A token argument of the wrong type raises ConfigError without the token in it."""
    with pytest.raises(ConfigError, match="api_token") as caught:
        TelemetryConfig(api_token=token, environ={})

    assert TOKEN not in str(caught.value)
    assert TOKEN not in repr(caught.value.value)


# --- repr, describe, equality -------------------------------------------------------------


def test_repr_masks_token() -> None:
    """repr() and str() show the token as *** and never its text."""
    config = TelemetryConfig(api_token=TOKEN, environ={})

    assert TOKEN not in repr(config)
    assert TOKEN not in str(config)
    assert "api_token='***'" in repr(config)


def test_repr_without_token() -> None:
    """With no token, repr() shows None rather than a mask."""
    assert "api_token=None" in repr(TelemetryConfig(environ={}))


def test_describe_masks_token() -> None:
    """describe() yields each setting with its variable and source, the token masked."""
    config = TelemetryConfig(api_token=TOKEN, environ={"TELEMETRY_TIMEOUT": "4"})

    rows = {name: (env_key, value, source) for name, env_key, value, source in config.describe()}

    assert rows["api_token"] == ("TELEMETRY_API_TOKEN", "***", "argument")
    assert rows["timeout"] == ("TELEMETRY_TIMEOUT", 4.0, "environment")
    assert rows["max_retries"] == ("TELEMETRY_MAX_RETRIES", 3, "default")
    assert set(rows) == set(config.sources)
    assert TOKEN not in repr(list(config.describe()))


def test_equality_by_value() -> None:
    """Configs with the same values are equal, wherever the values came from."""
    from_arguments = TelemetryConfig(timeout=4, data_dir="/d", environ={})
    from_env = TelemetryConfig(environ={"TELEMETRY_TIMEOUT": "4.0", "TELEMETRY_DATA_DIR": "/d"})

    assert from_arguments == from_env
    assert from_arguments != from_arguments.replace(timeout=5)
    assert from_arguments != "TelemetryConfig()"


def test_not_hashable() -> None:
    """hash() of a config raises TypeError, because configs compare by value."""
    with pytest.raises(TypeError, match="unhashable"):
        hash(TelemetryConfig(environ={}))


def test_api_configured() -> None:
    """api_configured needs both api_enabled and an api_url."""
    url = "http://127.0.0.1:9/runs"

    assert TelemetryConfig(api_url=url, environ={}).api_configured is True
    assert TelemetryConfig(environ={}).api_configured is False
    assert TelemetryConfig(api_url=url, api_enabled=False, environ={}).api_configured is False


# --- replace() and immutability -----------------------------------------------------------


def test_replace_keeps_other_values() -> None:
    """replace() changes the named settings and keeps every other value and its source."""
    config = TelemetryConfig(
        api_token=TOKEN, environ={"TELEMETRY_TIMEOUT": "4", "TELEMETRY_DATA_DIR": "/d"}
    )

    changed = config.replace(max_retries=7)

    assert changed.max_retries == 7
    assert changed.sources["max_retries"] == "argument"
    assert changed.timeout == 4.0
    assert changed.sources["timeout"] == "environment"
    assert changed.api_token == TOKEN
    assert changed.data_dir == pathlib.Path("/d")
    assert config.max_retries == 3


def test_replace_ignores_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """replace() reads nothing from os.environ, even for settings that were defaults."""
    config = TelemetryConfig(environ={})
    monkeypatch.setenv("TELEMETRY_BATCH_INTERVAL", "9")

    changed = config.replace(timeout=2)

    assert changed.batch_interval == 1.0
    assert changed.sources["batch_interval"] == "default"


def test_replace_rederives_paths() -> None:
    """Changing data_dir moves the derived paths, but not paths that were set."""
    derived = TelemetryConfig(data_dir="/old", environ={})
    pinned = TelemetryConfig(data_dir="/old", db_path="/pinned.db", environ={})

    moved = derived.replace(data_dir="/new")
    moved_pinned = pinned.replace(data_dir="/new")

    assert moved.ndjson_dir == pathlib.Path("/new/journal")
    assert moved.db_path == pathlib.Path("/new/telemetry.db")
    assert moved.sources["db_path"] == "default"
    assert moved_pinned.ndjson_dir == pathlib.Path("/new/journal")
    assert moved_pinned.db_path == pathlib.Path("/pinned.db")


@pytest.mark.parametrize("name", ["timout", "sources", "environ", "api_key"])
def test_replace_unknown_name(name: str) -> None:
    """replace() with a name that is not a setting raises TypeError naming it."""
    config = TelemetryConfig(environ={})

    with pytest.raises(TypeError, match=f"unknown setting '{name}'"):
        config.replace(**{name: 1})


def test_replace_invalid_value() -> None:
    """replace() parses the new value like an argument."""
    with pytest.raises(ConfigError, match="invalid durability="):
        TelemetryConfig(environ={}).replace(durability="sometimes")


def test_immutable() -> None:
    """Setting an attribute raises AttributeError that points to replace()."""
    config = TelemetryConfig(environ={})

    with pytest.raises(AttributeError, match=r"replace\(timeout=\.\.\.\)"):
        config.timeout = 1.0  # type: ignore[misc]

    with pytest.raises(AttributeError, match="immutable"):
        config.new_attribute = 1  # type: ignore[attr-defined]

    assert config.timeout == 10.0


def test_immutable_delete() -> None:
    """Deleting an attribute raises AttributeError and keeps the value."""
    config = TelemetryConfig(environ={})

    with pytest.raises(AttributeError):
        del config.timeout


def test_immutable_sources() -> None:
    """The sources mapping cannot be changed through the config."""
    config = TelemetryConfig(environ={})

    with pytest.raises(TypeError):
        config.sources["timeout"] = "argument"  # type: ignore[index]


# --- errors -------------------------------------------------------------------------------


def test_config_error_classes() -> None:
    """ConfigError is both a ValueError and a TelemetryError, so either catches it."""
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, TelemetryError)


def test_config_error_attributes() -> None:
    """ConfigError keeps the key, the value and the expectation it reports."""
    error = ConfigError("TELEMETRY_TIMEOUT", "soon", "a number of seconds")

    assert error.key == "TELEMETRY_TIMEOUT"
    assert error.value == "soon"
    assert error.expected == "a number of seconds"
    assert str(error) == "invalid TELEMETRY_TIMEOUT='soon': expected a number of seconds"


def test_url_password_masked() -> None:
    """A password in api_url is masked in repr, describe() and ConfigError messages."""
    config = TelemetryConfig(api_url="http://bob:hunter2secret@127.0.0.1/runs", environ={})
    invalid = TelemetryConfig(api_url="ftp://bob:hunter2secret@127.0.0.1/runs", environ={})

    with pytest.raises(ConfigError) as caught:
        invalid.validate()

    assert "hunter2secret" not in repr(config)
    assert "hunter2secret" not in str(list(config.describe()))
    assert "hunter2secret" not in str(caught.value)
    assert "bob:***@127.0.0.1" in repr(config)


def test_url_token_masked() -> None:
    """The token's value is masked wherever api_url contains it, in every output."""
    url = f"http://127.0.0.1:8080/hooks/{TOKEN}/runs?token={TOKEN}&region=eu"
    config = TelemetryConfig(api_url=url, api_token=TOKEN, environ={})
    invalid = TelemetryConfig(api_url="ftp" + url[4:], api_token=TOKEN, environ={})

    with pytest.raises(ConfigError) as caught:
        invalid.validate()
    described = dict((name, value) for name, _, value, _ in config.describe())

    assert TOKEN not in repr(config)
    assert TOKEN not in str(caught.value)
    assert described["api_url"] == "http://127.0.0.1:8080/hooks/***/runs?token=***&region=eu"


def test_url_token_masked_from_environment() -> None:
    """A token in TELEMETRY_API_URL is masked when both come from the environment."""
    environ = {
        "TELEMETRY_API_URL": f"http://127.0.0.1:8080/runs?t={TOKEN}",
        "TELEMETRY_API_TOKEN": TOKEN,
    }
    config = TelemetryConfig(environ=environ)
    assert TOKEN not in str(list(config.describe()))


def test_resolve_config_masks_token_in_invalid_url() -> None:
    """An invalid TELEMETRY_API_URL is reported with the token in it masked."""
    environ = {
        "TELEMETRY_API_URL": f"127.0.0.1:8080/runs?key={TOKEN}",
        "TELEMETRY_API_TOKEN": TOKEN,
    }
    _, ignored = resolve_config(environ)
    assert [error.key for error in ignored] == ["TELEMETRY_API_URL"]
    assert TOKEN not in str(ignored[0])


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1/r?token=abc&n=1", "http://127.0.0.1/r?token=***&n=1"),
        ("http://127.0.0.1/r?API-Key=abc", "http://127.0.0.1/r?API-Key=***"),
        ("http://127.0.0.1/r?sig=abc#part", "http://127.0.0.1/r?sig=***#part"),
        ("http://127.0.0.1/r?flag&token", "http://127.0.0.1/r?flag&token"),
        ("http://127.0.0.1/r?tokens=abc", "http://127.0.0.1/r?tokens=abc"),
        ("http://u:pw@127.0.0.1/r", "http://u:***@127.0.0.1/r"),
    ],
)
def test_mask_url_query(url: str, expected: str) -> None:
    """Values of query parameters named like credentials are masked, and nothing else."""
    assert mask_url(url) == expected


def test_mask_url_encoded_secret() -> None:
    """A secret is masked in its percent-encoded form too."""
    assert mask_url("http://127.0.0.1/r?q=a%2Fb%2Bc", ["a/b+c"]) == "http://127.0.0.1/r?q=***"


def test_mask_url_ignores_empty_secret() -> None:
    """An empty or None secret masks nothing."""
    assert mask_url("http://127.0.0.1/r", ["", None]) == "http://127.0.0.1/r"


def test_url_secrets_lists_credentials() -> None:
    """url_secrets returns the password and each secret query value, raw and decoded."""
    secrets = url_secrets("http://u:pw@127.0.0.1/r?token=a%2Bb&n=1&key=")
    assert secrets == ["pw", "a%2Bb", "a+b"]


# -- resolve_config -------------------------------------------------------------------------


def test_resolve_config_keeps_valid_settings() -> None:
    """resolve_config applies the environment when every variable is valid."""
    config, ignored = resolve_config({"TELEMETRY_TIMEOUT": "2.5"}, data_dir="/srv/store")
    assert config.timeout == 2.5
    assert config.data_dir == pathlib.Path("/srv/store")
    assert ignored == ()


def test_resolve_config_drops_invalid_variables() -> None:
    """Each invalid variable falls back to its default and is reported; the rest apply."""
    environ = {
        "TELEMETRY_TIMEOUT": "soon",
        "TELEMETRY_MAX_RETRIES": "99",
        "TELEMETRY_DURABILITY": "batch",
    }
    config, ignored = resolve_config(environ)
    assert config.timeout == 10.0
    assert config.max_retries == 3
    assert config.durability == "batch"
    assert sorted(error.key for error in ignored) == [
        "TELEMETRY_MAX_RETRIES",
        "TELEMETRY_TIMEOUT",
    ]


def test_resolve_config_masks_invalid_token() -> None:
    """An invalid token is reported without its value."""
    _, ignored = resolve_config({"TELEMETRY_API_TOKEN": "has space-secret"})
    assert [error.key for error in ignored] == ["TELEMETRY_API_TOKEN"]
    assert "secret" not in str(ignored[0])


def test_resolve_config_raises_for_arguments() -> None:
    """An invalid argument is not forgiven: it raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="timeout"):
        resolve_config({}, timeout="-1")
