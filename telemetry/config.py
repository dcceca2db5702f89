"""TelemetryConfig: settings resolved from arguments, the environment and defaults.

Each setting is looked up in this order: an explicit constructor argument, then its
``TELEMETRY_*`` environment variable, then the default. docs/config.md lists every key.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple
from urllib.parse import quote, quote_plus, unquote_plus, urlsplit

from telemetry.errors import ConfigError

__all__ = [
    "DURABILITY_MODES",
    "ENV_PREFIX",
    "SECRET_QUERY_PARAMETERS",
    "ConfigSource",
    "ResolvedConfig",
    "TelemetryConfig",
    "default_data_dir",
    "mask_url",
    "mask_url_password",
    "parse_bool",
    "resolve_config",
    "url_secrets",
]

ENV_PREFIX = "TELEMETRY_"
DURABILITY_MODES = ("fsync", "batch", "none")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
MASK = "***"
# A token must fit an HTTP header unchanged: visible ASCII, no spaces or control characters.
_HEADER_TOKEN = re.compile(r"[!-~]+")

SECRET_QUERY_PARAMETERS = frozenset(
    {
        "access_token",
        "api_key",
        "api_token",
        "apikey",
        "auth",
        "auth_token",
        "client_secret",
        "key",
        "passwd",
        "password",
        "secret",
        "sig",
        "signature",
        "token",
        "x_amz_security_token",
        "x_amz_signature",
        "x_goog_signature",
    }
)
"""Names of URL query parameters whose values mask_url hides, compared in lower case and
with "-" read as "_"."""

ConfigSource = Literal["argument", "environment", "default"]
Durability = Literal["fsync", "batch", "none"]


def parse_bool(text: str, key: str) -> bool:
    """Parse a boolean setting, accepting only the words in TRUE_WORDS and FALSE_WORDS.

    Raises:
        ConfigError: the text is none of those words, compared without case or spaces.
    """
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    expected = f"one of {', '.join(sorted(TRUE_WORDS))} or {', '.join(sorted(FALSE_WORDS))}"
    raise ConfigError(key, text, expected)


def mask_url_password(url: str) -> str:
    """Return ``url`` with the password of its user information, if any, replaced by ***."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", f":{MASK}@", 1)
    return parts._replace(netloc=netloc).geturl()


def url_secrets(url: str) -> list[str]:
    """Return the credentials written in ``url``: its password and secret query values.

    A query value is secret when its parameter's name is in SECRET_QUERY_PARAMETERS. The
    values are returned as they appear in the URL (percent-encoded) and decoded, without
    duplicates and without empty strings. A URL that urlsplit rejects gives [].
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return []
    found = [password] if password else []
    for name, value in _query_pairs(parts.query):
        if _is_secret_parameter(name):
            found += [value, unquote_plus(value)]
    return list(dict.fromkeys(secret for secret in found if secret))


def mask_url(url: str, secrets: Iterable[str | None] = ()) -> str:
    """Return ``url`` with every credential in it replaced by ***.

    Masked are the password of the user information, the values of the query parameters
    named in SECRET_QUERY_PARAMETERS, and each of ``secrets`` (such as the API token)
    wherever it occurs in the URL, as plain text or percent-encoded. None and empty
    strings in ``secrets`` are ignored.
    """
    masked = mask_url_password(url)
    try:
        parts = urlsplit(masked)
    except ValueError:
        parts = None
    if parts is not None and parts.query:
        pairs = []
        for pair in parts.query.split("&"):
            name, separator, _ = pair.partition("=")
            secret = separator and _is_secret_parameter(name)
            pairs.append(f"{name}={MASK}" if secret else pair)
        masked = parts._replace(query="&".join(pairs)).geturl()

    forms = {
        form
        for secret in secrets
        if secret
        for form in (secret, quote(secret, safe=""), quote(secret), quote_plus(secret, safe=""))
    }
    for form in sorted(forms, key=len, reverse=True):
        masked = masked.replace(form, MASK)
    return masked


def _query_pairs(query: str) -> Iterator[tuple[str, str]]:
    # Split by hand rather than with parse_qsl, so that the values stay as written.
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        yield name, value


def _is_secret_parameter(name: str) -> bool:
    return unquote_plus(name).strip().lower().replace("-", "_") in SECRET_QUERY_PARAMETERS


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Return the default store: ``$XDG_DATA_HOME/agent-telemetry``, else ``~/.local/share/...``.

    The XDG Base Directory specification states that a relative XDG_DATA_HOME is invalid and must
    be ignored, so only an absolute one is used.
    """
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "agent-telemetry"
    return Path.home() / ".local" / "share" / "agent-telemetry"


_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")


def _parse_int(value: object, key: str) -> int:
    # Only ASCII digits: int() would also take "1_0" and digits of other scripts.
    if isinstance(value, bool):
        raise ConfigError(key, value, "an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    raise ConfigError(key, value, "an integer")


def _parse_float(value: object, key: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(key, value, "a number of seconds")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ConfigError(key, value, "a number of seconds")


def _parse_bool_value(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return parse_bool(value, key)
    raise ConfigError(key, value, "a boolean")


def _parse_path(value: object, key: str) -> Path:
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, str) and text.strip():
            return Path(text).expanduser()
    raise ConfigError(key, value, "a non-empty file system path")


def _parse_optional_str(value: object, key: str) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    raise ConfigError(key, value, "a string")


def _parse_durability(value: object, key: str) -> str:
    if isinstance(value, str) and value.strip().lower() in DURABILITY_MODES:
        return value.strip().lower()
    raise ConfigError(key, value, f"one of {', '.join(DURABILITY_MODES)}")


@dataclass(frozen=True)
class _Setting:
    name: str
    parse: Callable[[object, str], Any]
    default: Any
    secret: bool = False

    @property
    def env_key(self) -> str:
        return ENV_PREFIX + self.name.upper()


# Defaults of None for the three paths mean "derived from data_dir" (see _resolve_paths).
_SETTINGS: tuple[_Setting, ...] = (
    _Setting("enabled", _parse_bool_value, True),
    _Setting("data_dir", _parse_path, None),
    _Setting("ndjson_dir", _parse_path, None),
    _Setting("db_path", _parse_path, None),
    _Setting("api_url", _parse_optional_str, None),
    _Setting("api_token", _parse_optional_str, None, secret=True),
    _Setting("api_enabled", _parse_bool_value, True),
    _Setting("max_retries", _parse_int, 3),
    _Setting("timeout", _parse_float, 10.0),
    _Setting("durability", _parse_durability, "fsync"),
    _Setting("batch_interval", _parse_float, 1.0),
    _Setting("end_run_timeout", _parse_float, 3.0),
    _Setting("retry_after_max", _parse_float, 30.0),
    _Setting("otel", _parse_bool_value, False),
)
_BY_NAME = {setting.name: setting for setting in _SETTINGS}


class TelemetryConfig:
    """Resolved settings of a TelemetryClient.

    Every keyword argument overrides its environment variable (``TELEMETRY_`` plus the
    name in upper case), which overrides the default. An argument left as None is not
    given. Values from the environment are parsed as text; arguments may be of their own
    type or text. ``environ`` replaces ``os.environ`` as the source, for tests and tools.

    Attributes:
        enabled: record anything at all. False turns the client into a no-op.
        data_dir: the store's directory. ``ndjson_dir`` and ``db_path`` default to
            ``data_dir / "journal"`` and ``data_dir / "telemetry.db"``.
        api_url: the URL that runs are POSTed to; None leaves API posting off.
        api_token: sent as a Bearer token. Masked in repr, str and describe().
        api_enabled: post runs when api_url is set.
        max_retries: retries of one post after its first attempt.
        timeout: seconds one HTTP request may take.
        durability: when a journal line reaches the disk: fsync, batch or none.
        batch_interval: seconds between flushes in batch mode.
        end_run_timeout: seconds end_run may spend posting; the rest stays pending.
        retry_after_max: the longest Retry-After, in seconds, that a post waits for.
        otel: send each run as an OpenTelemetry span too (docs/opentelemetry.md). Needs
            the ``otel`` extra: ``pip install 'agent-telemetry[otel]'``.
        sources: where each value came from: argument, environment or default.

    Raises:
        ConfigError: a value cannot be parsed; the message names the key and the value.
    """

    enabled: bool
    data_dir: Path
    ndjson_dir: Path
    db_path: Path
    api_url: str | None
    api_token: str | None
    api_enabled: bool
    max_retries: int
    timeout: float
    durability: Durability
    batch_interval: float
    end_run_timeout: float
    retry_after_max: float
    otel: bool
    sources: Mapping[str, ConfigSource]

    def __init__(
        self,
        *,
        enabled: bool | str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        ndjson_dir: str | os.PathLike[str] | None = None,
        db_path: str | os.PathLike[str] | None = None,
        api_url: str | None = None,
        api_token: str | None = None,
        api_enabled: bool | str | None = None,
        max_retries: int | str | None = None,
        timeout: float | str | None = None,
        durability: str | None = None,
        batch_interval: float | str | None = None,
        end_run_timeout: float | str | None = None,
        retry_after_max: float | str | None = None,
        otel: bool | str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        arguments = {
            "enabled": enabled,
            "data_dir": data_dir,
            "ndjson_dir": ndjson_dir,
            "db_path": db_path,
            "api_url": api_url,
            "api_token": api_token,
            "api_enabled": api_enabled,
            "max_retries": max_retries,
            "timeout": timeout,
            "durability": durability,
            "batch_interval": batch_interval,
            "end_run_timeout": end_run_timeout,
            "retry_after_max": retry_after_max,
            "otel": otel,
        }
        env = os.environ if environ is None else environ
        sources: dict[str, ConfigSource] = {}
        for setting in _SETTINGS:
            value, source = self._resolve(setting, arguments[setting.name], env)
            object.__setattr__(self, setting.name, value)
            sources[setting.name] = source
        object.__setattr__(self, "sources", MappingProxyType(sources))
        self._resolve_paths(env)

    @staticmethod
    def _resolve(
        setting: _Setting, argument: object, env: Mapping[str, str]
    ) -> tuple[Any, ConfigSource]:
        try:
            if argument is not None:
                return setting.parse(argument, setting.name), "argument"
            text = env.get(setting.env_key)
            if text is not None and text.strip():
                return setting.parse(text, setting.env_key), "environment"
        except ConfigError as exc:
            if setting.secret:
                raise ConfigError(exc.key, MASK, exc.expected) from None
            raise
        return setting.default, "default"

    def _resolve_paths(self, env: Mapping[str, str]) -> None:
        if self.data_dir is None:
            object.__setattr__(self, "data_dir", default_data_dir(env))
        if self.ndjson_dir is None:
            object.__setattr__(self, "ndjson_dir", self.data_dir / "journal")
        if self.db_path is None:
            object.__setattr__(self, "db_path", self.data_dir / "telemetry.db")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"TelemetryConfig is immutable; use replace({name}=...)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"TelemetryConfig is immutable; {name} cannot be deleted")

    def replace(self, **changes: Any) -> TelemetryConfig:
        """Return a copy with the given settings changed, resolved as arguments.

        The copy takes every other value from this config, never from the environment,
        except the paths derived from a data_dir that changes.

        Raises:
            TypeError: a name is not a setting.
        """
        unknown = sorted(set(changes) - set(_BY_NAME))
        if unknown:
            raise TypeError(f"unknown setting {unknown[0]!r}; settings are: {', '.join(_BY_NAME)}")
        kept: dict[str, Any] = {}
        for name in _BY_NAME:
            if name in changes:
                continue
            derived_path = name in ("ndjson_dir", "db_path") and self.sources[name] == "default"
            if derived_path and "data_dir" in changes:
                continue
            kept[name] = getattr(self, name)
        merged = TelemetryConfig(**kept, **changes, environ={})
        sources = {name: self.sources[name] for name in kept} | {
            name: "argument" for name in changes
        }
        sources.update({name: "default" for name in _BY_NAME if name not in sources})
        object.__setattr__(merged, "sources", MappingProxyType(sources))
        return merged

    def validate(self) -> TelemetryConfig:
        """Check the values against their allowed ranges and return this config.

        Raises:
            ConfigError: names the key (the environment variable when the value came from
                the environment), the value and what is expected. The token is masked.
        """
        if self.max_retries < 0 or self.max_retries > 10:
            self._fail("max_retries", "an integer from 0 to 10")
        for name in ("timeout", "batch_interval", "retry_after_max"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                self._fail(name, "a positive number of seconds")
        if not math.isfinite(self.end_run_timeout) or self.end_run_timeout < 0:
            self._fail("end_run_timeout", "zero or a positive number of seconds")
        if self.api_url is not None:
            parts = urlsplit(self.api_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                self._fail("api_url", "an http:// or https:// URL, such as https://host/runs")
        if self.api_token is not None and not _HEADER_TOKEN.fullmatch(self.api_token):
            self._fail("api_token", "printable ASCII characters without spaces")
        return self

    def _fail(self, name: str, expected: str) -> None:
        setting = _BY_NAME[name]
        key = setting.env_key if self.sources[name] == "environment" else name
        raise ConfigError(key, self._shown_value(setting), expected)

    @property
    def api_configured(self) -> bool:
        """Whether runs are to be posted: the API is enabled and has a URL."""
        return self.api_enabled and self.api_url is not None

    def describe(self) -> Iterator[tuple[str, str, object, ConfigSource]]:
        """Yield (name, environment variable, value, source) per setting.

        The token is masked, and so are the credentials in api_url (see mask_url): its
        password, its secret query values, and the token wherever it occurs in it.
        """
        for setting in _SETTINGS:
            yield (
                setting.name,
                setting.env_key,
                self._shown_value(setting),
                self.sources[setting.name],
            )

    def _shown_value(self, setting: _Setting) -> object:
        value = getattr(self, setting.name)
        if setting.secret and value is not None:
            return MASK
        if setting.name == "api_url" and value is not None:
            return mask_url(value, [self.api_token])
        return value

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, _, value, _ in self.describe())
        return f"TelemetryConfig({fields})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TelemetryConfig):
            return NotImplemented
        return all(getattr(self, s.name) == getattr(other, s.name) for s in _SETTINGS)

    __hash__ = None  # type: ignore[assignment]


class ResolvedConfig(NamedTuple):
    """A validated config and the environment variables left out to get it."""

    config: TelemetryConfig
    ignored: tuple[ConfigError, ...]
    """One error per invalid environment variable, whose default was used instead."""


def resolve_config(environ: Mapping[str, str] | None = None, **arguments: Any) -> ResolvedConfig:
    """Resolve and validate a config, using the default for each invalid environment variable.

    A typo in one ``TELEMETRY_*`` variable should not stop what the others allow, so each
    variable that fails to parse or validate is dropped and reported in ``ignored``, and
    the others still apply. Arguments are not forgiven: they come from code or from a
    command line, where the error can be fixed at once.

    Args:
        environ: the environment to read (default: os.environ).
        **arguments: settings given as TelemetryConfig keyword arguments.

    Raises:
        ConfigError: an argument is invalid.
        TypeError: an argument is not a setting.
    """
    remaining = dict(os.environ if environ is None else environ)
    ignored: list[ConfigError] = []
    # Each pass drops one variable, so the loop ends after at most one pass per variable.
    while True:
        try:
            config = TelemetryConfig(**arguments, environ=remaining).validate()
        except ConfigError as exc:
            if exc.key not in remaining:
                raise
            ignored.append(exc)
            del remaining[exc.key]
            continue
        return ResolvedConfig(config, tuple(ignored))
