from pathlib import Path

import pytest

from previewd.config import load_config
from previewd.errors import ConfigError
from previewd.instance import render_config

REPO = Path(__file__).resolve().parents[2]


def test_example_config_is_the_rendered_template_and_loads():
    text = (REPO / "config.example.yaml").read_text()
    assert text == render_config(), "config.example.yaml drifted from previewd.instance.CONFIG_TEMPLATE"
    config = load_config(REPO / "config.example.yaml")
    assert config.parity == "aitk" and config.device == "auto"
    assert config.model_source("flux2").path == "black-forest-labs/FLUX.2-dev"
    assert config.db_url == f"sqlite:///{REPO / 'state' / 'previewd.db'}"


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "models" / "qwen_image_2512").mkdir(parents=True)
    path = tmp_path / "c.yaml"
    path.write_text("inbox: in\nstate_dir: ./st\noutbox_root: /abs/out\n"
                    "models:\n  qwen_image_2512: {path: models/qwen_image_2512}\n  flux2: {path: org/repo}\n")
    config = load_config(path)
    assert config.inbox == tmp_path / "in" and config.state_dir == tmp_path / "st"
    assert config.outbox_root == Path("/abs/out")
    assert config.model_source("qwen_image_2512").path == str(tmp_path / "models" / "qwen_image_2512")
    assert config.model_source("flux2").path == "org/repo"  # a hub id stays a hub id


def test_every_problem_is_reported_with_its_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inbox: in\nstate_dir: st\ndevice: gpu0\nparity: exact\nworker: {lease_seconds: -1}\n"
                    "models: {sdxl: {path: x}}\ntypo_key: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for key in ("outbox_root: Field required", "device:", "parity:", "worker.lease_seconds:", "models:",
                "typo_key: unknown field (extra_forbidden)"):
        assert key in message, message
    assert info.value.exit_code == 2


def test_unreadable_and_non_mapping_configs(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("inbox: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
