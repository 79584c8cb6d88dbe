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


EXAMPLE_ARAS = {"ostris/accuracy_recovery_adapters": ("qwen_image_torchao_uint3.safetensors",
                                                      "qwen_image_edit_2509_torchao_uint3.safetensors")}
"""The accuracy recovery adapters ai-toolkit's example configs name on the hub (../shared/aitk-examples)."""


def write_hf_cache_file(cache: Path, repo_id: str, filename: str, tensors: dict) -> Path:
    """`filename` of `repo_id` in a Hugging Face cache laid out as hf_hub_download leaves it."""
    from safetensors.numpy import save_file

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("c0ffee")
    save_file(tensors, str(snapshot / filename))
    return snapshot / filename


@pytest.fixture
def example_aras(tmp_path, monkeypatch) -> Path:
    """The example configs' adapters where ai-toolkit would have left them: the hub ones in a local
    Hugging Face cache, the edit example's relative one in the returned folder (pass it as aitk_root,
    ai-toolkit's working directory). Placeholders: intake only checks that they are there."""
    import huggingface_hub.constants
    import numpy as np

    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    placeholder = {"diffusion_model.img_in.lora_A.weight": np.zeros((1, 1), np.float32),
                   "diffusion_model.img_in.lora_B.weight": np.zeros((1, 1), np.float32)}
    for repo_id, files in EXAMPLE_ARAS.items():
        for filename in files:
            write_hf_cache_file(cache, repo_id, filename, placeholder)
    aitk_root = tmp_path / "ai-toolkit"
    aitk_root.mkdir()
    from safetensors.numpy import save_file

    save_file(placeholder, str(aitk_root / "qwen_image_edit_torchao_uint3.safetensors"))
    return aitk_root
