"""Scoring an exported model: ``kunlun.serving.load(DIR).score(rows)``.

Needs torch, numpy, pyarrow and omegaconf (for the data section of file-source exports), not
the trainer, TorchRec or fbgemm. ``DIR`` is written by ``kunlun export`` (see
:mod:`kunlun.serving.format`).
"""

from kunlun.serving.format import ExportError
from kunlun.serving.model import ServingModel, load

__all__ = ["ExportError", "ServingModel", "load"]
