"""The `previewd` command. The only place that turns errors into exit codes.

Exit codes: 0 ok, 2 bad usage or config, 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from previewd.config import Config, find_config, load_config
from previewd.errors import ConfigError, PreviewdError
from previewd.fileio import atomic_copy
from previewd.logs import setup_logging

log = logging.getLogger("previewd")

EXIT_OK, EXIT_FAILURE = 0, 1




def _load(args: argparse.Namespace) -> Config:
    config = load_config(find_config(args.config))
    setup_logging(config.log_level)
    return config


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("previewd")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


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

    config = _load(args)
    if args.device:
        config = _with_device(config, args.device)
    return Service(config, exit_when_idle=args.exit_when_idle).run()


def _with_device(config: Config, device: str) -> Config:
    """One config for every GPU of a host: `--device` overrides its `device`, validated alike."""
    from pydantic import ValidationError

    try:
        return Config.model_validate(config.model_dump() | {"device": device})
    except ValidationError as exc:
        raise ConfigError(f"--device {device}: {exc.errors()[0]['msg']}") from None


def cmd_render(args: argparse.Namespace) -> int:
    from previewd import outbox
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
        outbox.flush()
    return EXIT_FAILURE if failures else EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from previewd.serve import make_server

    config = _load(args)
    server = make_server(config, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving previews read-only on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return EXIT_OK


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


def cmd_plan(args: argparse.Namespace) -> int:
    """Each model's components, bytes and chosen placement, without loading weights."""
    from dataclasses import asdict

    from previewd.pipelines import device as devices
    from previewd.pipelines import memory
    from previewd.pipelines.model_sources import resolve_source
    from previewd.pipelines.quantization import Quantization
    from previewd.spec import MODEL_IDS

    unknown = sorted(set(args.model) - set(MODEL_IDS))
    if unknown:
        raise ConfigError(f"unknown model id(s) {', '.join(unknown)} (known: {', '.join(MODEL_IDS)})")
    config = _load(args)
    if args.budget_gb is not None:
        # Planning for a card this machine may not have.
        device, dtype = "cuda", config.dtype if config.dtype != "auto" else "bfloat16"
        settings = memory.MemorySettings(budget_bytes=int(args.budget_gb * memory.GiB),
                                         placement=config.memory.placement,
                                         quantize_to_fit=config.memory.quantize_to_fit,
                                         reserve_bytes=int(config.memory.reserve_gb * memory.GiB))
    else:
        device, dtype = devices.resolve(config.device, config.dtype)
        settings = memory.settings_for(config.memory, device)
    plans = []
    for model_id in args.model or list(config.models) or MODEL_IDS:
        source = config.model_source(model_id)
        try:
            resolve_source(source.path)
        except PreviewdError as exc:
            print(f"{model_id}: {exc}; planned from the released model's config")
        plan = memory.plan_model(model_id, source, device=device, dtype=dtype, settings=settings,
                                 run_precision=memory.quantization_precision(Quantization.configured(source)))
        plans.append(plan)
        if not args.json:
            print(f"== {model_id} ({source.path})\n{plan.table()}\n")
    if args.json:
        print(json.dumps([asdict(plan) for plan in plans], indent=2, default=str))
    return EXIT_OK


def _open(config: Config):
    from previewd.queue.store import JobStore

    config.state_dir.mkdir(parents=True, exist_ok=True)
    return JobStore(config.db_url)


def _store(config: Config):
    """The queue, its schema brought to head (as the daemon does at start-up)."""
    store = _open(config)
    try:
        store.upgrade_schema()
    except BaseException:
        store.close()
        raise
    return store


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from previewd import database_identity

    config = _load(args)
    store = _open(config)
    try:
        found, head = store.upgrade_schema()
    finally:
        store.close()
    # This database is now the one state_dir belongs to, even if it replaced a lost one.
    database_identity.check_after_connect(config.db_url, config.state_dir, adopt=True)
    print(f"schema at {head} (head)" if found == head else f"schema upgraded from {found or 'nothing'} to {head}")
    return EXIT_OK


def cmd_db_current(args: argparse.Namespace) -> int:
    from previewd.queue import migrate

    store = _open(_load(args))
    try:
        found = store.schema_revision()
    finally:
        store.close()
    script = migrate.script_directory()
    head = script.get_current_head()
    if found is None:
        print(f"no schema version (an empty database, or one of previewd 0.1): `previewd db upgrade` "
              f"creates or adopts it; head is {head}")
    elif found == head:
        print(f"{found} (head)")
    else:
        migrate.check_known(script, found)
        print(f"{found} (head is {head}: run `previewd db upgrade`, or start a daemon)")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from previewd import doctor

    config = _load(args)
    if args.systemd_dropin:
        print(doctor.systemd_dropin(config), end="")
        return EXIT_OK
    checks = doctor.run_checks(config)
    print(doctor.format_table(checks))
    return EXIT_OK if all(c.ok for c in checks) else EXIT_FAILURE


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from previewd import status
    from previewd.queue import DatabaseUnavailable

    config = _load(args)
    while True:
        try:
            store = _store(config)
            try:
                report = status.build_report(config, store, failed_limit=args.limit)
            finally:
                store.close()
        except DatabaseUnavailable as exc:
            report = {"database": {"reachable": False, "error": str(exc)}}
        text = json.dumps(report, indent=2) if args.json else (
            status.format_text(report) if report["database"]["reachable"] else report["database"]["error"])
        if args.watch and sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")  # redraw in place
        print(text, flush=True)
        if not args.watch:
            return EXIT_OK if report["database"]["reachable"] else EXIT_FAILURE
        time.sleep(args.watch)


def _change(args: argparse.Namespace, action: str) -> int:
    """retry/cancel: the jobs named by id, or all of them in the wanted states (of one run)."""
    from previewd.queue import JobState
    from previewd.tasks import RenderTask

    wanted = {"retry": [JobState.FAILED], "cancel": [JobState.QUEUED, JobState.RUNNING]}[action]
    if not args.jobs and not args.all and args.run is None:
        raise ConfigError(f"{action}: name job ids, --{'failed' if action == 'retry' else 'all'} or --run NAME")
    config = _load(args)
    store = _store(config)
    try:
        ids = list(args.jobs)
        if args.all or args.run is not None:
            for job in store.list_jobs(states=wanted):
                target = RenderTask.model_validate(job.payload).target
                if args.run is None or args.run in (target.title, Path(target.job_dir or "").name):
                    ids.append(job.id)
        changed = getattr(store, action)(ids) if ids else []
    finally:
        store.close()
    for job in changed:
        print(f"#{job.id}: {job.state.value}")
    if not changed:
        print(f"{action}: no job to change")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="previewd", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", help="path to config.yaml (default: $PREVIEWD_CONFIG, ./config.yaml, "
                        "$XDG_CONFIG_HOME/previewd/config.yaml, /etc/previewd/config.yaml)")
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
    sp.add_argument("--device", help="render on this device instead of the config's (one daemon per GPU: cuda:N)")
    sp.set_defaults(func=cmd_run)

    db = sub.add_parser("db", help="the queue database's schema").add_subparsers(dest="db_command", required=True)
    sp = with_config(db.add_parser("upgrade", help="create or migrate the schema to head (the daemon does it "
                                                   "at start-up; safe while other daemons run)"))
    sp.set_defaults(func=cmd_db_upgrade)
    sp = with_config(db.add_parser("current", help="the database's schema revision"))
    sp.set_defaults(func=cmd_db_current)

    sp = with_config(sub.add_parser("render", help="render one request now, without the daemon"))
    sp.add_argument("request")
    sp.add_argument("--out", help="output folder (default: outbox_root/<request name>)")
    sp.set_defaults(func=cmd_render)

    sp = with_config(sub.add_parser("serve", help="serve every output folder's page read-only over HTTP"))
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    sp.add_argument("--port", type=int, default=8765, help="port (0: any free one; default 8765)")
    sp.set_defaults(func=cmd_serve)

    sp = with_config(sub.add_parser("submit", help="copy request files into the inbox atomically"))
    sp.add_argument("files", nargs="+")
    sp.set_defaults(func=cmd_submit)

    sp = with_config(sub.add_parser("doctor", help="check models, device, folders and database without loading "
                                                   "weights"))
    sp.add_argument("--systemd-dropin", action="store_true",
                    help="print the systemd drop-in (ReadWritePaths) for the folders this config writes to")
    sp.set_defaults(func=cmd_doctor)

    sp = with_config(sub.add_parser("plan", help="memory plan of each model: components, bytes, placement, "
                                                 "planned peak (no weights loaded)"))
    sp.add_argument("model", nargs="*", help="model ids (default: the configured ones)")
    sp.add_argument("--budget-gb", type=float, help="plan for a CUDA card with this many GiB (default: memory:)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_plan)

    sp = with_config(sub.add_parser("status", help="queue state and progress"))
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--limit", type=int, default=20, help="failed jobs to list (the newest)")
    sp.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                    help="refresh every SECONDS (default 2) until interrupted")
    sp.set_defaults(func=cmd_status)

    for action, what, every in (("retry", "requeue failed or cancelled jobs", "--failed"),
                                ("cancel", "cancel queued or running jobs", "--all")):
        sp = with_config(sub.add_parser(action, help=f"{what} (all or none: an unknown id or wrong state changes nothing)"))
        sp.add_argument("jobs", nargs="*", type=int)
        sp.add_argument(every, dest="all", action="store_true",
                        help="every failed job" if action == "retry" else "every queued or running job")
        sp.add_argument("--run", metavar="NAME", help="only the jobs of this training run or request")
        sp.set_defaults(func=lambda a, action=action: _change(a, action))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging("INFO")
    try:
        return args.func(args)
    except PreviewdError as exc:
        print(f"previewd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
