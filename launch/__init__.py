"""Per-rank entry point (``kunlun.launch.main``) and TorchX components (``components.py``)."""
