"""The `previewd` command. The only place that turns errors into exit codes.

Exit codes: 0 ok, 2 bad usage or config, 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from previewd.config import Config, load_config
from previewd.errors import PreviewdError
from previewd.fileio import atomic_copy

log = logging.getLogger("previewd")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _setup_logging(level: str) -> None:
    # Under systemd, journald adds its own timestamps.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level), format=fmt, stream=sys.stderr, force=True)


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    _setup_logging(config.log_level)
    return config


# -- commands --------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    from previewd.instance import init_instance

    config_path = init_instance(Path(args.dir), tiny=args.tiny, example=args.example, force=args.force)
    print(f"wrote {config_path}")
    print(f"start the daemon with: previewd run -c {config_path}")
    return EXIT_OK


def cmd_tiny_models(args: argparse.Namespace) -> int:
    from previewd.pipelines.tiny import build_all

    for model_id, folder in build_all(Path(args.dir), args.model or None).items():
        print(f"{model_id}: {folder}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from previewd.service import Service

    return Service(_load(args), exit_when_idle=args.exit_when_idle).run()


def cmd_render(args: argparse.Namespace) -> int:
    from previewd.fileio import write_missing
    from previewd.intake.planner import Planner
    from previewd.worker import Renderer

    config = _load(args)
    plan = Planner(config).plan_request(Path(args.request), trusted=True,
                                        out_dir=Path(args.out).resolve() if args.out else None)
    write_missing(plan.assets)
    renderer = Renderer(config)
    failures = 0
    try:
        for task in plan.tasks:
            try:
                result = renderer.render(task)
                entry = renderer.write(task, result)
            except PreviewdError as exc:
                failures += 1
                log.error("prompt %d: %s", task.target.prompt_index, exc)
                continue
            print(Path(task.target.out_dir) / entry.image)
    finally:
        renderer.close()
    return EXIT_FAILURE if failures else EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    config = _load(args)
    config.inbox.mkdir(parents=True, exist_ok=True)
    for name in args.files:
        source = Path(name)
        if not source.is_file():
            raise PreviewdError(f"{source}: no such file")
        target = config.inbox / source.name
        counter = 1
        while target.exists():
            target = config.inbox / f"{source.stem}-{counter}{source.suffix}"
            counter += 1
        # The watcher never sees a half-written request.
        atomic_copy(source, target)
        print(target)
    return EXIT_OK


def _store(config: Config):
    from previewd.queue.store import JobStore

    config.state_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(config.db_url)
    store.create_schema()
    return store


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    store = _store(config)
    try:
        counts = {state.value: n for state, n in store.counts().items()}
        running = store.list_jobs(states=["running"])
        failed = store.list_jobs(states=["failed"], limit=args.limit)
        workers = store.workers()
    finally:
        store.close()

    def job_view(job) -> dict:
        target = job.payload.get("target", {})
        return {"id": job.id, "state": job.state.value, "model": job.model, "attempts": job.attempts,
                "progress": job.progress, "worker": job.worker_id, "checkpoint": target.get("checkpoint"),
                "prompt_index": target.get("prompt_index"), "out_dir": target.get("out_dir"),
                "last_error": job.last_error}

    from previewd.rejections import rejected_inputs

    report = {"counts": counts, "running": [job_view(j) for j in running],
              "failed": [job_view(j) for j in failed],
              "rejected_inputs": [{"path": str(path), "reason": reason}
                                  for path, reason in rejected_inputs(list(config.watch_roots))],
              "workers": [{"id": w.id, "last_heartbeat": w.last_heartbeat.isoformat() if w.last_heartbeat else None,
                           "current_job": w.current_job_id} for w in workers]}
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print("jobs: " + ", ".join(f"{state} {n}" for state, n in sorted(counts.items())) if counts else "jobs: none")
    for job in report["running"]:
        progress = f"{job['progress'] * 100:.0f}%" if job["progress"] is not None else "starting"
        print(f"running #{job['id']} {job['model']} {job['checkpoint'] or 'base'} prompt {job['prompt_index']}: "
              f"{progress} on {job['worker']}")
    for job in report["failed"]:
        print(f"failed  #{job['id']} {job['model']} {job['checkpoint'] or 'base'} prompt {job['prompt_index']} "
              f"after {job['attempts']} attempt(s): {job['last_error']}")
    for rejected in report["rejected_inputs"]:
        print(f"rejected {rejected['reason']}")
    for worker in report["workers"]:
        print(f"worker {worker['id']}: last heartbeat {worker['last_heartbeat']}, job {worker['current_job']}")
    return EXIT_OK


def _change(args: argparse.Namespace, action: str) -> int:
    config = _load(args)
    store = _store(config)
    try:
        changed = getattr(store, action)(args.jobs)
    finally:
        store.close()
    for job in changed:
        print(f"#{job.id}: {job.state.value}")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="previewd", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", required=True, help="path to config.yaml")
        return sp

    sp = sub.add_parser("init", help="write a config and the folders it names")
    sp.add_argument("dir")
    sp.add_argument("--tiny", action="store_true", help="build tiny random-weight models and use them (CPU demo)")
    sp.add_argument("--example", action="store_true", help="put an example training run and request in the inbox")
    sp.add_argument("--force", action="store_true", help="overwrite an existing config.yaml")
    sp.set_defaults(func=cmd_init)

    sp = sub.add_parser("tiny-models", help="write tiny random-weight pipelines for every model id")
    sp.add_argument("dir")
    sp.add_argument("--model", action="append", help="only this model id (repeatable)")
    sp.set_defaults(func=cmd_tiny_models)

    sp = with_config(sub.add_parser("run", help="run the daemon"))
    sp.add_argument("--exit-when-idle", action="store_true",
                    help="exit once the inbox has settled and the queue is empty")
    sp.set_defaults(func=cmd_run)

    sp = with_config(sub.add_parser("render", help="render one request now, without the daemon"))
    sp.add_argument("request")
    sp.add_argument("--out", help="output folder (default: outbox_root/<request name>)")
    sp.set_defaults(func=cmd_render)

    sp = with_config(sub.add_parser("submit", help="copy request files into the inbox atomically"))
    sp.add_argument("files", nargs="+")
    sp.set_defaults(func=cmd_submit)

    sp = with_config(sub.add_parser("status", help="queue state and progress"))
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--limit", type=int, default=20, help="failed jobs to list")
    sp.set_defaults(func=cmd_status)

    for action, what in (("retry", "requeue failed or cancelled jobs"), ("cancel", "cancel queued or running jobs")):
        sp = with_config(sub.add_parser(action, help=f"{what} (all or none: an unknown id or wrong state changes nothing)"))
        sp.add_argument("jobs", nargs="+", type=int)
        sp.set_defaults(func=lambda a, action=action: _change(a, action))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup_logging("INFO")
    try:
        return args.func(args)
    except PreviewdError as exc:
        print(f"previewd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
