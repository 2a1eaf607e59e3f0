"""Feature schema, example sources, the ``Batch`` type and the sharded loader."""

from kunlun.data.batch import Batch, ExampleBlock, collate  # noqa: F401
from kunlun.data.errors import BadRowTracker, DataError  # noqa: F401
from kunlun.data.schema import ContextFeature, EventType, FeatureSchema, TableSpec  # noqa: F401
