"""`modeldiff export | dashboard | toy | demo`: results out of the database, the dashboard,
the synthetic sweep and the whole pipeline on the demo models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli.interp import add_consent
from engine.cli.types import port, run_id
from engine.errors import UserError

DASHBOARD_HOST = "127.0.0.1"  # this machine only
DASHBOARD_PORT = 8501  # Streamlit's own default
DEMO_OUT = "runs/demo"


def cmd_export(args: argparse.Namespace) -> None:
    """Export a results table (or the feature table) to Parquet or CSV."""
    from engine.results import Database

    texts = {}
    for item in args.where or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--where takes column=value, got {item!r}")
        texts[key] = value
    with Database(args.db, read_only=True, hold=False) as db:
        # Typed, so `dead=false` is False (not the true-ish string "false").
        filters = db.parse_filters(args.what, texts)
        run = args.run_id
        if "run_id" in filters:  # --where run_id=X is --run-id X
            where_run = str(filters.pop("run_id"))
            if run is not None and run != where_run:
                raise UserError(f"--run-id {run} and --where run_id={where_run} differ; give one")
            run = where_run
        path = db.export(args.what, args.out, run_id=run, **filters)
    print(f"wrote {path}")


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Open the dashboard on a results database (Streamlit, on this machine by default)."""
    import importlib.util
    import os
    import subprocess

    if importlib.util.find_spec("streamlit") is None:
        raise UserError('the dashboard needs Streamlit: pip install -e ".[app]"')
    db = args.db if args.db is not None else _env_db()
    if db is None:
        raise UserError("name the results database: modeldiff dashboard --db results.duckdb")
    if not db.is_file():
        raise UserError(
            f"no results database at {db}; create one with `modeldiff analyze --run RUN "
            f"--store STORE --db {db}` (see docs/analysis.md)"
        )
    if not is_loopback(args.host):
        print(
            f"warning: --host {args.host} serves the dashboard, which can write triage and "
            f"run models, to other machines on the network, with no login; use {DASHBOARD_HOST} "
            "unless they are trusted",
            file=sys.stderr,
        )
    command = dashboard_command(db.resolve(), args.host, args.port)
    print(f"modeldiff dashboard on http://{args.host}:{args.port} (Ctrl-C stops it)")
    # The app refuses an address beyond this machine unless it was chosen here, on purpose.
    from dashboard.serving import ALLOWED_HOST

    env = {**os.environ, ALLOWED_HOST: args.host}
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0


def is_loopback(host: str) -> bool:
    """Whether an address to bind is reachable from this machine only."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def _env_db() -> Path | None:
    import os

    value = os.environ.get("MODELDIFF_DB")
    return Path(value) if value else None


def dashboard_command(
    db: Path, host: str = DASHBOARD_HOST, port: int = DASHBOARD_PORT
) -> list[str]:
    """The `streamlit run` command line that serves the dashboard on `db`."""
    import dashboard

    app = Path(dashboard.__file__).resolve().parent / "app.py"
    return [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.address", host, "--server.port", str(port),
        "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
        # Headless: no e-mail prompt on a first run, the URL is printed instead of opened.
        "--server.headless", "true", "--client.toolbarMode", "viewer",
        "--", "--db", str(db),
    ]  # fmt: skip


def cmd_toy(args: argparse.Namespace) -> int:
    """Synthetic ground-truth comparison of standard, DFC and DSF crosscoders."""
    from engine.toy.sweep import main as toy_main

    return toy_main(args.toy_args)


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo: harvest -> train -> analyze -> explain -> verify -> dashboard, on the two
    demo models; every finished stage is reused when run again."""
    from engine.demo import DemoSettings, dashboard_url, run_demo

    out = Path(args.out)
    print(
        "modeldiff demo: SmolLM2-135M-Instruct (A) vs Gemma-3-270m (B) on offline chat and "
        f"prose -> {out}"
    )
    settings = DemoSettings(progress=not args.quiet, yes=args.yes, max_cost=args.max_cost)
    demo = run_demo(out, settings)
    print(f"demo finished in {demo.timings['total']['seconds']:.0f} s; results in {demo.db}")
    if args.no_dashboard:
        print(f"open it with: modeldiff dashboard --db {demo.db}")
        return 0
    print(f"dashboard: {dashboard_url(args.host, args.port)}")
    args.db = demo.db
    return cmd_dashboard(args)


# -- parsers ----------------------------------------------------------------------------------


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--what", required=True, help="a table name, or feature_table")
    p.add_argument("--out", required=True, type=Path, help="a .parquet or .csv path")
    p.add_argument("--run-id", type=run_id, help="only this run's rows")
    p.add_argument("--where", nargs="+", metavar="COLUMN=VALUE", help="equality filters")
    p.set_defaults(func=cmd_export)


def add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help=cmd_dashboard.__doc__, description=cmd_dashboard.__doc__)
    p.add_argument("--db", type=Path, help="DuckDB results file (default: $MODELDIFF_DB)")
    p.add_argument(
        "--port", type=port, default=DASHBOARD_PORT, help=f"port (default {DASHBOARD_PORT})"
    )
    p.add_argument(
        "--host",
        default=DASHBOARD_HOST,
        help=f"address to bind (default {DASHBOARD_HOST}: this machine only)",
    )
    p.set_defaults(func=cmd_dashboard)


def add_toy(sub: argparse._SubParsersAction) -> None:
    # Its options belong to the sweep's own parser (see `modeldiff toy --help`).
    p = sub.add_parser("toy", help=cmd_toy.__doc__, add_help=False)
    p.set_defaults(func=cmd_toy)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    p.add_argument("--out", default=DEMO_OUT, help=f"output directory (default {DEMO_OUT})")
    p.add_argument("--no-dashboard", action="store_true", help="stop after the pipeline")
    p.add_argument("--host", default=DASHBOARD_HOST, help="dashboard address (default localhost)")
    p.add_argument("--port", type=port, default=DASHBOARD_PORT)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_consent(p)  # used only with ANTHROPIC_API_KEY set
    p.set_defaults(func=cmd_demo)
