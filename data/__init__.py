"""Feature schema, example sources, the ``Batch`` type and the sharded loader.

Imports are lazy: ``kunlun.data.schema`` must load without TorchRec (GPU kernel boxes).
"""

from typing import Any

_LAZY = {
    "Batch": "kunlun.data.batch",
    "ExampleBlock": "kunlun.data.block",
    "collate": "kunlun.data.batch",
    "BadRowTracker": "kunlun.data.errors",
    "DataError": "kunlun.data.errors",
    "ContextFeature": "kunlun.data.schema",
    "EventType": "kunlun.data.schema",
    "FeatureSchema": "kunlun.data.schema",
    "TableSpec": "kunlun.data.schema",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kunlun.data' has no attribute {name!r}")
