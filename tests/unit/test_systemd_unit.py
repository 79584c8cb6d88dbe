import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "previewd.service"


def _service() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNIT)
    return dict(parser["Service"])


def test_unit_is_a_notify_service_with_restart_and_its_own_user():
    service = _service()
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    assert service["User"] == "previewd" and "WatchdogSec" in service
    assert service["ExecStart"].split()[1:3] == ["run", "-c"]
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path):
    unit = tmp_path / "previewd.service"
    # The real ExecStart path exists only once installed; everything else is checked as written.
    unit.write_text(UNIT.read_text().replace("/opt/previewd/.venv/bin/previewd", "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
