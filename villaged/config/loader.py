"""Reading the configuration: TOML file → frozen dataclasses, and checks of the files it names.

This module owns the mapping from a TOML document to the schema in ``villaged.config.model``.
``read_section`` walks any section dataclass generically (field types from
``typing.get_type_hints``, bounds and forms from field metadata), so it needs no change when a
section is added. Every problem becomes a ``ConfigError`` whose message is one line naming the
file, the dotted key path and the expected form.

``load_config`` never touches the files a configuration refers to; ``check_config_files`` does
(TLS certificate and key, keyset), so a packaged example config loads on any machine.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import stat
import tomllib
import types
from dataclasses import MISSING, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from villaged.config.model import Config, Setting, SettingError, setting_of

if TYPE_CHECKING:
    from collections.abc import Mapping

    from _typeshed import DataclassInstance

__all__ = ["MAX_CONFIG_BYTES", "ConfigError", "check_config_files", "load_config", "read_section"]

# A configuration file is a few kilobytes; anything near this is a mistake, not a config.
MAX_CONFIG_BYTES = 1024 * 1024

_SectionT = TypeVar("_SectionT", bound="DataclassInstance")


class ConfigError(Exception):
    """The configuration (or a file it names) is unusable. ``str()`` is one line."""

    def __init__(self, file: Path, problem: str, *, key: str | None = None) -> None:
        where = f"{file}: {key}: " if key else f"{file}: "
        # One line always, whatever a value or an OS message contained.
        super().__init__((where + problem).replace("\r", "\\r").replace("\n", "\\n"))
        self.file = file
        self.key = key
        self.problem = problem


def load_config(path: Path) -> Config:
    """Read and validate the TOML file at ``path``; relative paths start at its directory."""
    document = _read_toml(path)
    config = read_section(Config, document, file=path, base_dir=path.absolute().parent)
    cluster = config.cluster
    if cluster.enabled and cluster.member(config.server.node) is None:
        raise ConfigError(
            path,
            f'this node ("{config.server.node}", [server] node) is not one of the'
            f" [[cluster.nodes]] ({', '.join(n.id for n in cluster.nodes)})",
            key="cluster.nodes",
        )
    if cluster.enabled and config.federation.enabled:
        raise ConfigError(
            path,
            "federation is not available on a cluster node yet ([cluster] enabled = true)",
            key="federation.enabled",
        )
    return replace(config, source=path)


def read_section(
    cls: type[_SectionT],
    table: Mapping[str, Any],
    *,
    file: Path,
    base_dir: Path,
    prefix: str = "",
) -> _SectionT:
    """Build the section dataclass ``cls`` from the TOML ``table`` found at key path ``prefix``.

    ``file`` is named in errors; relative paths are resolved against ``base_dir``.
    """
    return _read_section(cls, table, prefix, _Context(file=file, base_dir=base_dir))


@dataclass(frozen=True, slots=True)
class _Context:
    file: Path
    base_dir: Path

    def resolve(self, value: Path) -> Path:
        return Path(os.path.abspath(self.base_dir / value))


def _read_section(
    cls: type[_SectionT], table: Mapping[str, Any], prefix: str, context: _Context
) -> _SectionT:
    hints = get_type_hints(cls)
    keys = [f for f in fields(cls) if not setting_of(f.metadata).internal]
    known = [f.name for f in keys]
    for name in table:
        if name not in known:
            raise ConfigError(
                context.file, f'unknown key "{_join(prefix, name)}" (known: {", ".join(known)})'
            )
    values: dict[str, Any] = {}
    for f in keys:
        path = _join(prefix, f.name)
        hint = hints[f.name]
        setting = setting_of(f.metadata)
        if f.name in table:
            values[f.name] = _read_value(hint, table[f.name], setting, path, context)
        elif _is_section(hint):
            values[f.name] = _read_section(hint, {}, path, context)
        elif f.default is not MISSING:
            default = f.default
            values[f.name] = context.resolve(default) if isinstance(default, Path) else default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
        else:
            raise ConfigError(context.file, f"missing; expected {_form(hint, setting)}", key=path)
    section = cls(**values)
    validate = getattr(section, "validate", None)
    if validate is not None:
        try:
            validate(lambda name: _join(prefix, name))
        except SettingError as exc:
            raise ConfigError(context.file, exc.problem, key=exc.key) from None
    return section


def _read_value(hint: Any, raw: object, setting: Setting, path: str, context: _Context) -> Any:
    """Convert one TOML value to the field type ``hint``, or raise a ``ConfigError``."""

    def wrong(reason: str = "") -> ConfigError:
        detail = f" ({reason})" if reason else ""
        problem = f"expected {_form(hint, setting)}, got {_show(raw)}{detail}"
        return ConfigError(context.file, problem, key=path)

    origin = get_origin(hint)
    if _is_section(hint):
        if not isinstance(raw, dict):
            raise wrong()
        return _read_section(hint, raw, path, context)
    if origin is Union or origin is types.UnionType:
        # TOML has no null: an optional key is either absent (its default) or a value.
        (inner,) = (arg for arg in get_args(hint) if arg is not type(None))
        return _read_value(inner, raw, setting, path, context)
    if origin is tuple:
        item_hint = get_args(hint)[0]
        item_setting = replace(setting, form=setting.item_form, item_form=None)
        if not isinstance(raw, list):
            raise wrong()
        return tuple(
            _read_value(item_hint, item, item_setting, f"{path}[{index}]", context)
            for index, item in enumerate(raw)
        )
    if origin is Literal:
        if not isinstance(raw, str) or raw not in get_args(hint):
            raise wrong()
        return raw
    if hint is bool:
        if not isinstance(raw, bool):
            raise wrong()
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise wrong()
        if (setting.min is not None and raw < setting.min) or (
            setting.max is not None and raw > setting.max
        ):
            raise wrong()
        return raw
    if not isinstance(raw, str):
        raise wrong()
    if hint is Path:
        if not raw or "\0" in raw:
            raise wrong()
        return context.resolve(Path(raw))
    if setting.parse is not None:
        try:
            return setting.parse(raw)
        except ValueError as exc:
            raise wrong(str(exc)) from None
    if hint is str:
        return raw
    raise TypeError(f"{path}: no way to read a {hint!r} from TOML; declare key(parse=...)")


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and is_dataclass(hint)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _form(hint: Any, setting: Setting) -> str:
    """The one-line description of what a key accepts, for error messages."""
    if setting.form is not None:
        return setting.form
    origin = get_origin(hint)
    if _is_section(hint):
        return "a table"
    if origin is Union or origin is types.UnionType:
        (inner,) = (arg for arg in get_args(hint) if arg is not type(None))
        return _form(inner, setting)
    if origin is tuple:
        item_setting = replace(setting, form=setting.item_form, item_form=None)
        return f"an array of {_form(get_args(hint)[0], item_setting)}"
    if origin is Literal:
        return "one of " + ", ".join(f'"{choice}"' for choice in get_args(hint))
    if hint is bool:
        return "true or false"
    if hint is int:
        if setting.min is not None and setting.max is not None:
            return f"an integer from {setting.min} to {setting.max}"
        if setting.min is not None:
            return f"an integer of at least {setting.min}"
        if setting.max is not None:
            return f"an integer of at most {setting.max}"
        return "an integer"
    if hint is Path:
        return "a path (relative to the config file's directory)"
    return "a string"


def _show(raw: object) -> str:
    """A short, one-line rendering of a TOML value for error messages."""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, str):
        return json.dumps(raw if len(raw) <= 64 else raw[:61] + "...", ensure_ascii=False)
    if isinstance(raw, int | float):
        return repr(raw)
    if isinstance(raw, list):
        return "an array"
    if isinstance(raw, dict):
        return "a table"
    if isinstance(raw, dt.datetime):
        return "a date-time"
    if isinstance(raw, dt.date):
        return "a date"
    return "a time"


_TOML_POSITION = re.compile(r" \(at line (\d+), column (\d+)\)$")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, f"cannot read config file: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, f"config file is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(path, f"line {line}: invalid TOML: not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _TOML_POSITION.search(message)
        if position is None:  # "(at end of document)"
            line = max(len(text.splitlines()), 1)
            problem = message.replace("(at end of document)", "(at end of file)")
        else:
            line = int(position[1])
            problem = f"{message[: position.start()]} (column {position[2]})"
        raise ConfigError(path, f"line {line}: invalid TOML: {problem}") from None


# --- the files a configuration names --------------------------------------------------------


def check_config_files(config: Config) -> None:
    """Check that the TLS certificate, its key and the keyset exist, parse and are private.

    The keyset's contents belong to ``villaged.storage.crypto``; only its presence and mode
    are checked here.
    """
    file = config.source
    cert_path, key_path = config.tls.cert, config.tls.key
    try:
        certificate = x509.load_pem_x509_certificates(_read(file, "tls.cert", cert_path))[0]
    except ValueError:
        raise ConfigError(
            file, f"file {cert_path} is not a PEM X.509 certificate", key="tls.cert"
        ) from None
    key_data = _read(file, "tls.key", key_path, private=True)
    try:
        private_key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise ConfigError(
            file, f"file {key_path} holds an encrypted key; it must be unencrypted", key="tls.key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            file, f"file {key_path} is not a PEM private key", key="tls.key"
        ) from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private_key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise ConfigError(
            file,
            f"file {key_path} is not the key of the certificate in {cert_path} (tls.cert)",
            key="tls.key",
        )
    _read(file, "storage.keyset", config.storage.keyset, private=True)


def _read(file: Path, key: str, path: Path, *, private: bool = False) -> bytes:
    """The bytes of a regular file named by ``key``; ``private`` files must be mode 0600."""
    try:
        # Open first and inspect the open file, so the checks and the read see the same file.
        # O_NONBLOCK keeps a FIFO put in place of a file from hanging the check.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(file, f"file {path} does not exist", key=key) from None
    except OSError as exc:
        raise ConfigError(file, f"cannot open file {path}: {exc.strerror}", key=key) from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise ConfigError(file, f"{path} is not a regular file", key=key)
        mode = stat.S_IMODE(status.st_mode)
        if private and mode & ~0o600:
            raise ConfigError(file, f"file {path} has mode {mode:04o}; it must be 0600", key=key)
        with open(fd, "rb", closefd=False) as stream:
            # Certificates, keys and keysets are small; the bound keeps a mistake harmless.
            return stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:  # pragma: no cover - needs a failing disk
        raise ConfigError(file, f"cannot read file {path}: {exc.strerror}", key=key) from None
    finally:
        os.close(fd)
