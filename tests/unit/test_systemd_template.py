"""systemd/previewd@.service: one daemon per GPU from one config, the instance name its device."""

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from previewd.cli import parser

UNITS = Path(__file__).resolve().parents[2] / "systemd"
TEMPLATE = UNITS / "previewd@.service"


def _sections(path: Path) -> configparser.ConfigParser:
    units = configparser.ConfigParser(strict=False, interpolation=None)
    units.optionxform = str
    units.read(path)
    return units


def test_template_is_the_single_unit_with_the_instance_as_device():
    template, single = _sections(TEMPLATE), _sections(UNITS / "previewd.service")
    start = template["Service"]["ExecStart"]
    assert start == single["Service"]["ExecStart"] + " --device %i"
    args = parser().parse_args([a.replace("%i", "cuda:1") for a in start.split()[1:]])
    assert (args.command, args.device) == ("run", "cuda:1")
    # Everything else (notify, watchdog, restart, hardening) is the single unit's.
    assert {k: v for k, v in template["Service"].items() if k != "ExecStart"} == \
        {k: v for k, v in single["Service"].items() if k != "ExecStart"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_template(tmp_path):
    unit = tmp_path / TEMPLATE.name
    unit.write_text(TEMPLATE.read_text().replace("/opt/previewd/.venv/bin/previewd", "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
