import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
UNIT = UNITS / "previewd.service"


def _service(unit: Path = UNIT) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(unit)
    return dict(parser["Service"])


def test_unit_is_a_notify_service_with_restart_and_its_own_user():
    service = _service()
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    assert service["User"] == "previewd" and "WatchdogSec" in service
    assert service["ExecStart"].split()[1:3] == ["run", "-c"]
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"


def test_a_bad_config_is_not_restarted_and_the_trainers_cache_is_not_overridden():
    for unit in sorted(UNITS.glob("*.service")):
        service = _service(unit)
        assert service["RestartPreventExitStatus"] == "2", unit.name
        assert "HF_HOME" not in service.get("Environment", ""), unit.name
    assert _service()["EnvironmentFile"].startswith("-/etc/previewd/")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("name", sorted(p.name for p in UNITS.glob("*.service")))
def test_systemd_accepts_the_unit(tmp_path, name):
    unit = tmp_path / name
    # The real ExecStart path exists only once installed; everything else is checked as written.
    text = (UNITS / name).read_text()
    text = text.replace("/opt/previewd/.venv/bin/previewd", "/bin/true").replace("%h/previewd/.venv/bin/previewd",
                                                                                "/bin/true")
    unit.write_text(text.replace("/usr/bin/nvidia-modprobe", "/bin/true"))
    # Checked as a system unit: `--user` needs a user session, and the syntax is the same.
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_per_gpu_template_differs_from_the_plain_unit_only_by_its_device():
    plain, template = _service(), _service(UNITS / "previewd@.service")
    assert template.pop("ExecStart") == plain.pop("ExecStart") + " --device %i"
    assert template == plain
