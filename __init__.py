"""kunlun: a training framework for large recommendation models.

The repository root is the ``kunlun`` package; its sub-packages are

* ``kunlun.data``     feature schema, sources, the ``Batch`` type and the sharded loader
* ``kunlun.model``    embedding collections, dense towers, the ``RecModel`` that gets sharded
* ``kunlun.parallel`` sharding planner, TorchRec ``DistributedModelParallel`` wrapping
* ``kunlun.trainer``  config, training loop, checkpoints, metrics, TensorBoard
* ``kunlun.launch``   per-rank entry point and TorchX components
"""

__version__ = "0.1.0"
