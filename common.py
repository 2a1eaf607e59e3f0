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
