import os
from pathlib import Path

import pytest

# Tests never touch a model hub; the tiny models are built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import previewd.pipelines  # noqa: E402,F401  - arms the CPU-torchvision shim before anything imports torchvision


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(model_id) -> the folder of that model's tiny pipeline, built once per test run on
    first request. Tests only read these folders; one that needs another build makes its own."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, Path] = {}

    def get(model_id: str) -> Path:
        if model_id not in built:
            from previewd.pipelines.tiny import build_all

            built.update(build_all(root, [model_id]))
        return built[model_id]

    return get


def pytest_collection_modifyitems(items):
    """Keep `-m "not slow"` fast: a test that builds or loads a tiny model must be marked slow."""
    unmarked = [item.nodeid for item in items
                if "tiny_model" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("mark these tests `slow` (they use tiny models): " + ", ".join(unmarked))
