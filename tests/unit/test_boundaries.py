"""Data flows one way; heavy or unrelated libraries stay out of modules that must not need them."""

import subprocess
import sys

import pytest

FORBIDDEN = {
    "previewd.config": {"torch", "sqlalchemy", "watchdog", "diffusers", "previewd.pipelines"},
    "previewd.spec": {"torch", "sqlalchemy", "watchdog", "previewd.pipelines"},
    "previewd.catalog": {"torch", "sqlalchemy", "watchdog", "previewd.pipelines"},
    "previewd.intake": {"torch", "sqlalchemy", "watchdog", "diffusers", "previewd.pipelines"},
    "previewd.intake.aitoolkit": {"torch", "sqlalchemy", "watchdog", "diffusers", "previewd.pipelines"},
    "previewd.intake.request": {"torch", "sqlalchemy", "watchdog", "diffusers", "previewd.pipelines"},
    "previewd.intake.planner": {"torch", "sqlalchemy", "watchdog", "previewd.pipelines", "previewd.queue"},
    "previewd.manifest": {"torch", "sqlalchemy", "previewd.queue", "previewd.pipelines"},
    "previewd.queue": {"torch", "diffusers", "watchdog", "previewd.pipelines", "previewd.intake"},
    "previewd.outbox": {"torch", "sqlalchemy", "previewd.queue"},
    "previewd.serve": {"torch", "sqlalchemy", "diffusers", "previewd.queue", "previewd.pipelines"},
    "previewd.pipelines": {"torch", "sqlalchemy", "watchdog", "previewd.queue"},
    "previewd.inbox": {"torch", "sqlalchemy", "previewd.intake", "previewd.queue"},
    "previewd.cli": {"torch", "diffusers"},
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_does_not_import(module):
    code = (f"import sys, {module}; "
            f"print(' '.join(sorted(m for m in {sorted(FORBIDDEN[module])!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"{module} pulls in {out}"


def test_pipelines_never_import_the_queue():
    code = ("import sys, previewd.pipelines.qwen.adapter, previewd.pipelines.flux2.adapter; "
            "print(' '.join(m for m in ('previewd.queue', 'sqlalchemy', 'watchdog', 'previewd.outbox') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
