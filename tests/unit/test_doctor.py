"""`previewd doctor` and the model check the worker makes before loading (no weights involved)."""

from pathlib import Path

import pytest

from previewd.cli import main
from previewd.config import load_config
from previewd.doctor import check_folders, systemd_dropin
from previewd.errors import ModelNotFound
from previewd.instance import render_config
from previewd.pipelines.model_sources import verify_source
from previewd.spec import ModelSource


def _config(tmp_path: Path, models: str) -> Path:
    path = tmp_path / "config.yaml"
    text = render_config()
    path.write_text(text[: text.index("models:")] + ("models:\n" + models if models else "models: {}\n"))
    return path


def test_a_missing_model_fails_doctor_naming_the_id_and_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = _config(tmp_path, f"  qwen_image_2512:\n    path: {tmp_path / 'nowhere'}\n"
                               "  flux2:\n    path: black-forest-labs/FLUX.2-dev\n")
    assert main(["doctor", "-c", str(config)]) == 1
    out = capsys.readouterr().out
    line_2512 = next(line for line in out.splitlines() if "qwen_image_2512" in line)
    assert line_2512.startswith("FAIL") and f"{tmp_path / 'nowhere'}: no such folder" in line_2512
    line_flux = next(line for line in out.splitlines() if "model flux2" in line)
    assert str(tmp_path / "hub") in line_flux and "hf download black-forest-labs/FLUX.2-dev" in line_flux
    assert "ok    database" in out and "device" in out


def test_an_incomplete_folder_says_what_it_lacks(tmp_path):
    folder = tmp_path / "model"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(ModelNotFound, match=r"qwen_image_2512: .*missing transformer/\*\.safetensors, vae/, "
                                             r"text_encoder/; previewd loads safetensors only"):
        verify_source("qwen_image_2512", ModelSource(path=str(folder)))


def test_unwritable_folders_are_found_and_the_dropin_lists_every_written_folder(tmp_path):
    config = load_config(_config(tmp_path, ""))
    blocked = tmp_path / "inbox"
    blocked.write_text("a file where a folder should be")
    failing = [c for c in check_folders(config) if not c.ok]
    assert [c.what for c in failing] == [f"folder {blocked}"]
    dropin = systemd_dropin(config)
    assert "[Service]" in dropin and f"ReadWritePaths={tmp_path / 'state'} {tmp_path / 'outbox'} {blocked}" in dropin
