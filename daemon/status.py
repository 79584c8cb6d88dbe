"""`previewd status`: what every worker is doing, the queue by run, failures and rejected inputs.

One report (a dict, which `--json` prints as it is) and one text rendering of it.
"""

from __future__ import annotations

import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

from previewd.config import Config
from previewd.queue import Job, JobState, JobStore
from previewd.rejections import logged_rejections, rejected_inputs
from previewd.tasks import RenderTask


def _eta(job: Job, elapsed: float, history: list[float]) -> float | None:
    """Seconds left: from how long this model's recent jobs took, or, with no history yet, from
    the denoising progress so far."""
    if history:
        return max(0.0, statistics.median(history) - elapsed)
    if job.progress:
        return elapsed * (1 - job.progress) / job.progress
    return None


def _job_view(job: Job, now: datetime, history: dict[str, list[float]] | None = None) -> dict[str, Any]:
    try:
        target = RenderTask.model_validate(job.payload).target.model_dump()
    except ValueError:  # a payload this version cannot read: show what the queue knows
        target = {}
    view = {"id": job.id, "state": job.state.value, "model": job.model, "attempts": job.attempts,
            "run": target.get("title"), "checkpoint": target.get("checkpoint"), "step": target.get("step"),
            "prompt_index": target.get("prompt_index"), "out_dir": target.get("out_dir", job.group),
            "worker": job.worker_id, "last_error": job.last_error}
    if job.state == JobState.RUNNING:
        elapsed = (now - job.started_at).total_seconds() if job.started_at else 0.0
        view |= {"phase": job.phase or "starting", "denoise_step": job.step, "denoise_steps": job.steps,
                 "progress": job.progress, "elapsed_seconds": round(elapsed, 1),
                 "eta_seconds": _round(_eta(job, elapsed, (history or {}).get(job.model, [])))}
    return view


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _worker_view(worker, now: datetime, lease_seconds: float) -> dict[str, Any]:
    age = (now - worker.last_heartbeat).total_seconds()
    # Dead workers are marked gone by the live ones; if none is left, age tells.
    gone = worker.gone_at is not None or age > lease_seconds
    return {"id": worker.id, "host": worker.hostname, "pid": worker.pid, "device": worker.device,
            "state": "gone" if gone else "live", "model": worker.model, "current_job": worker.current_job_id,
            "last_heartbeat": worker.last_heartbeat.isoformat(), "heartbeat_age_seconds": round(age, 1)}


def build_report(config: Config, store: JobStore, *, failed_limit: int = 20) -> dict[str, Any]:
    now = store.now()
    running = store.list_jobs(states=[JobState.RUNNING])
    history = {model: store.recent_durations(model) for model in {job.model for job in running}}
    by_group = store.group_counts()
    runs = []
    for group, counts in sorted(by_group.items()):
        active = counts.get(JobState.QUEUED, 0) + counts.get(JobState.RUNNING, 0)
        page = Path(group) / "index.html"
        runs.append({"out_dir": group, **{state.value: counts.get(state, 0) for state in JobState},
                     "page": str(page) if page.is_file() else None, "active": bool(active)})
    workers = [_worker_view(w, now, config.worker.lease_seconds) for w in store.workers()]
    jobs_by_id = {job.id: _job_view(job, now, history) for job in running}
    for worker in workers:
        worker["job"] = jobs_by_id.get(worker["current_job"])
    unreadable = store.unreadable()
    return {
        "database": {"reachable": True, "schema": store.schema_revision()},
        "counts": {state.value: n for state, n in store.counts().items()},
        "workers": workers,
        "running": list(jobs_by_id.values()),
        "runs": runs,
        "failed": [_job_view(j, now) for j in store.list_jobs(states=[JobState.FAILED], limit=failed_limit,
                                                              newest_first=True)],
        "rejected_inputs": [{"path": str(path), "reason": reason}
                            for path, reason in rejected_inputs(list(config.watch_roots))],
        # Inputs whose name could carry no error file (too long, an unwritable folder), newest first.
        "rejected_log": logged_rejections(config.state_dir),
        "unreadable": [{"job": u.job_id, "worker": u.worker_id, "host": u.hostname, "path": u.path,
                        "at": u.at.isoformat(), "recheck_after": u.until.isoformat()} for u in unreadable],
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _doing(job: dict[str, Any]) -> str:
    where = f"{job['run']} {job['checkpoint'] or 'base model'} prompt {job['prompt_index']}"
    phase = job["phase"]
    if phase == "denoising" and job["denoise_steps"]:
        phase = f"denoising step {job['denoise_step']}/{job['denoise_steps']}"
    return (f"job #{job['id']} {where}: {phase}, {_duration(job['elapsed_seconds'])} elapsed, "
            f"eta {_duration(job['eta_seconds'])}")


def format_text(report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = ["jobs: " + (", ".join(f"{state} {n}" for state, n in sorted(counts.items())) if counts else "none")]
    # By host, then device: one line per GPU.
    for worker in report["workers"]:
        doing = _doing(worker["job"]) if worker["job"] else (
            f"job #{worker['current_job']}" if worker["current_job"] else "idle")
        loaded = f", {worker['model']} loaded" if worker["model"] else ""
        lines.append(f"worker {worker['host']} {worker['device'] or '-'}: {worker['state']}, {doing}{loaded}, "
                     f"heartbeat {worker['heartbeat_age_seconds']:.0f}s ago (pid {worker['pid']}, {worker['id']})")
    for run in report["runs"]:
        if run["active"] or run["failed"]:
            page = f"  {run['page']}" if run["page"] else ""
            lines.append(f"run {run['out_dir']}: {run['queued']} queued, {run['running']} running, "
                         f"{run['done']} done, {run['failed']} failed{page}")
    for job in report["failed"]:
        lines.append(f"failed  #{job['id']} {job['model']} {job['run']} {job['checkpoint'] or 'base'} prompt "
                     f"{job['prompt_index']} after {job['attempts']} attempt(s): {job['last_error']}")
    for rejected in report["rejected_inputs"]:
        lines.append(f"rejected {rejected['reason']}")
    for logged in report.get("rejected_log", []):
        lines.append(f"rejected {logged['path']}: {logged['reason']} ({logged['at']}, in rejected.log)")
    for mark in report["unreadable"]:
        lines.append(f"queued  #{mark['job']}: {mark['host']} ({mark['worker']}) cannot read {mark['path']}")
    return "\n".join(lines)
