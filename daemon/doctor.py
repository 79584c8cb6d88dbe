"""`previewd doctor`: is this machine set up to render, without loading a single weight?

Each check says what it looked at and what to do. The daemon runs the same checks at start-up
and logs what fails; `doctor` prints them as a table and exits non-zero on a problem.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from previewd.config import Config


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str


def check_models(config: Config) -> list[Check]:
    """Every configured model's files are on this machine (a folder, or the hub cache)."""
    from previewd.errors import ModelNotFound
    from previewd.pipelines.model_sources import verify_source

    checks = []
    for model_id in config.models:
        try:
            root = verify_source(model_id, config.model_source(model_id))
        except ModelNotFound as exc:
            checks.append(Check(f"model {model_id}", False, str(exc).removeprefix(f"{model_id}: ")))
        else:
            checks.append(Check(f"model {model_id}", True, str(root)))
    return checks


def check_device(config: Config) -> Check:
    """The device and dtype the config asks for exist (imports torch; no model is loaded)."""
    from previewd.errors import ConfigError
    from previewd.pipelines import device as devices

    try:
        device, dtype = devices.resolve(config.device, config.dtype)
    except ConfigError as exc:
        return Check("device", False, str(exc))
    detail = f"{device}, {dtype}"
    if device == "cpu" and devices.nvidia_gpu_present():
        return Check("device", False, f"{detail}: an NVIDIA GPU is present but CUDA is unusable "
                                      f"({devices.cuda_problem()})")
    return Check("device", True, detail)


def _writable(folder: Path) -> str | None:
    """None when this user can create files in `folder` (tried for real: a read-only mount or a
    systemd ReadWritePaths that misses it shows up only then); else the reason."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".previewd-doctor-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def written_folders(config: Config) -> list[Path]:
    """Folders previewd writes to: its state, the outbox, and every watched folder (previews are
    written next to each training run, and error files next to each input)."""
    folders = [config.state_dir, config.outbox_root, *config.watch_roots]
    return list(dict.fromkeys(p.resolve() for p in folders))


def check_folders(config: Config) -> list[Check]:
    checks = []
    for folder in written_folders(config):
        reason = _writable(folder)
        if reason is None:
            checks.append(Check(f"folder {folder}", True, "writable"))
        else:
            hint = " (under systemd: add it with `previewd doctor --systemd-dropin`)" if _under_systemd() else ""
            checks.append(Check(f"folder {folder}", False, f"not writable by this user: {reason}{hint}"))
    for folder in config.allowed_roots:
        ok = os.access(folder, os.R_OK | os.X_OK)
        checks.append(Check(f"folder {folder}", ok, "readable" if ok else "not readable by this user"))
    return checks


def check_database(config: Config) -> Check:
    from previewd.queue.store import JobStore

    from previewd.queue import migrate

    try:
        with JobStore(config.db_url) as store:
            revision = store.schema_revision()
    except Exception as exc:  # noqa: BLE001 - any failure to open it is the finding
        return Check("database", False, f"{type(exc).__name__}: {exc}".splitlines()[0])
    head = migrate.script_directory().get_current_head()
    if revision is None:
        return Check("database", True, "opens; empty (the daemon creates the schema at start)")
    return Check("database", True, f"opens; schema {revision}" + ("" if revision == head else f", head is {head}"))


def run_checks(config: Config, *, device: bool = True) -> list[Check]:
    checks = [*check_folders(config), check_database(config), *check_models(config)]
    if device:
        checks.append(check_device(config))
    return checks


def _under_systemd() -> bool:
    return bool(os.environ.get("INVOCATION_ID"))


def systemd_dropin(config: Config) -> str:
    """A drop-in for previewd.service that lets it write where this config says (one place to add
    a training folder: the config, then run this again)."""
    paths = " ".join(str(p) for p in written_folders(config))
    return ("# /etc/systemd/system/previewd.service.d/paths.conf, written by `previewd doctor --systemd-dropin`\n"
            f"[Service]\nReadWritePaths={paths}\n")


def format_table(checks: list[Check]) -> str:
    width = max(len(c.what) for c in checks)
    return "\n".join(f"{'ok  ' if c.ok else 'FAIL'}  {c.what:<{width}}  {c.detail}" for c in checks)
