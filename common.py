"""The bottom layer of kunlun: what every package may import (it imports no kunlun module).

* :class:`ConfigError`: a configuration that cannot run; its message names where the value
  came from (file:line or the command line), the key, the value and what is allowed.
* :func:`default_cache_dir`: where downloaded data and file indexes are cached.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


class ConfigError(ValueError):
    """A configuration that cannot run. The message names source, key, value and what is allowed."""

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key


def default_cache_dir() -> Path:
    """``$KUNLUN_CACHE``, else ``~/.cache/kunlun``: downloads and indexes, never the repository."""
    return Path(os.environ.get("KUNLUN_CACHE", Path.home() / ".cache" / "kunlun")).expanduser()


class FieldError(ConfigError):
    """A config field with an impossible value, raised by the dataclass's ``__post_init__``
    (validation lives beside the fields). The dataclass does not know where it sits in the
    job config, so it names itself (``owner``) and the field relative to itself;
    ``kunlun.trainer.config.load_config`` turns that into the full key and the file:line or
    command line it came from."""

    def __init__(self, owner: type, field: str, value, expected: str):
        self.owner, self.field, self.value, self.expected = owner, field, value, expected
        super().__init__(f"config key {owner.__name__}.{field} = {value!r} is invalid: expected {expected}", key=field)

    def with_prefix(self, prefix: str) -> ConfigError:
        """The same error with the full key ``<prefix>.<field>`` (the job config's message)."""
        key = f"{prefix}.{self.field}" if prefix else self.field
        return ConfigError(f"config key {key!r} = {self.value!r} is invalid: expected {self.expected}", key=key)


def check(owner, ok: bool, field: str, expected: str) -> None:
    """Raise :class:`FieldError` for ``owner.<field>`` unless ``ok`` (``field`` may be dotted,
    e.g. ``events.dislike.heads``, or index a list, ``tasks[0].type``, for values the owner
    checks on behalf of a child)."""
    if not ok:
        value = owner
        for part in field.split("."):
            name, _, index = part.partition("[")  # a list element: tasks[0]
            value = value[name] if isinstance(value, dict) else getattr(value, name)
            if index:
                value = value[int(index.rstrip("]"))]
        raise FieldError(type(owner), field, list(value) if isinstance(value, (list, tuple)) else value, expected)


def check_positive(owner, *fields: str) -> None:
    """Every named integer field is > 0."""
    for name in fields:
        check(owner, getattr(owner, name) > 0, name, "an integer > 0")


def check_choice(owner, field: str, allowed) -> None:
    check(owner, getattr(owner, field) in allowed, field, f"one of {list(allowed)}")


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoint and export manifests)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
