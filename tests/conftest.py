import os

# Tests never touch a model hub; the tiny models are built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import previewd.pipelines  # noqa: E402,F401  - arms the CPU-torchvision shim before anything imports torchvision
