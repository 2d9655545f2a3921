"""`modeldiff` command line: one sub-command per stage of the data flow.

Errors a user can cause are printed as one line starting with ``error:`` (no traceback)
and exit with status 2; an interrupted run exits with 130 and resumes when rerun.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from engine.cli_types import (
    Parser,
    any_int,
    finite_float,
    non_negative_float,
    non_negative_int,
    port,
    positive_int,
    run_id,
)
from engine.config import ConfigError, HarvestConfig, RunConfig, load_run_config

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError)


def _user_errors() -> tuple[type[Exception], ...]:
    from engine.crosscoder.checkpoint import CheckpointError
    from engine.crosscoder.data import DataError
    from engine.crosscoder.trainer import TrainingError
    from engine.harvest.align import AlignmentError
    from engine.harvest.store import StoreError
    from engine.store import StoreDBError

    return (
        *USER_ERRORS,
        CheckpointError,
        DataError,
        TrainingError,
        StoreError,
        AlignmentError,
        StoreDBError,
    )


def cmd_harvest(args: argparse.Namespace) -> None:
    """Harvest aligned activation pairs of two models into an activation store."""
    from engine.harvest.pipeline import harvest, summary

    cfg = load_run_config(args.config).harvest if args.config else HarvestConfig()
    overrides = {
        "model_a": args.model_a,
        "model_b": args.model_b,
        "layer_a": args.layer_a,
        "layer_b": args.layer_b,
        "sources": args.sources,
        "weights": args.weights,
        "max_pairs": args.max_pairs,
        "context_length": args.context_length,
        "batch_tokens": args.batch_tokens,
        "store_dtype": args.store_dtype,
        "model_dtype": args.model_dtype,
        "device": args.device,
        "alignment": args.alignment,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(cfg, name, value)
    cfg.__post_init__()  # re-validate overrides
    rank, world_size = _harvest_rank(args)
    from engine.models.loading import quiet_transformers

    quiet_transformers()  # harvest prints one line per loaded model instead
    result = harvest(
        cfg,
        args.out,
        fresh=args.fresh,
        progress=not args.quiet and rank == 0,  # one bar, not one per process
        rank=rank,
        world_size=world_size,
    )
    print(summary(result))


def _harvest_rank(args: argparse.Namespace) -> tuple[int, int]:
    """(rank, world size) from --rank/--world-size, else RANK/WORLD_SIZE (torchrun), else
    (0, 1)."""
    import os

    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    try:
        rank = args.rank if args.rank is not None else int(env["RANK"] or 0)
        world = args.world_size if args.world_size is not None else int(env["WORLD_SIZE"] or 1)
    except ValueError:
        raise ConfigError(f"RANK and WORLD_SIZE must be integers, got {env}") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(
            f"rank {rank} of world size {world} is impossible: --world-size N needs N >= 1 "
            "and --rank from 0 to N-1"
        )
    return rank, world


def cmd_train(args: argparse.Namespace) -> None:
    """Train a crosscoder on paired activations (an activation store or a pairs file).

    Under `torchrun --nproc-per-node N` the N processes split every batch (data parallel).
    """
    from engine.config import load_preset, preset_names
    from engine.crosscoder.distributed import is_main_process
    from engine.crosscoder.normalize import Normalizer
    from engine.crosscoder.trainer import train

    # Fail on a bad config name before reading any activations.
    if args.preset is not None:
        load_preset(args.preset)
    elif not args.config.is_file() and str(args.config) not in preset_names():
        load_run_config(args.config)  # raises "config file not found", listing the presets
    source, dims, normalizer = _training_data(args)
    if args.preset is not None:
        cfg: RunConfig = load_preset(args.preset, dims)
    else:
        cfg = load_run_config(args.config, dims)
    if cfg.crosscoder is None:
        raise ConfigError(f"{args.config} has no [crosscoder] section")
    for name in ("steps", "batch_size", "device"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg.train, name, value)
    cfg.train.__post_init__()  # re-validate overrides
    if normalizer is not None:
        normalizer = Normalizer.from_median_norms(*normalizer, *dims)
    # With --fresh, train clears the run directory once the config and data are known good
    # (a typo must not cost the run), and refuses a folder that is not a training run.
    result = train(
        cfg.crosscoder,
        cfg.train,
        source,
        out_dir=args.out,
        resume=not args.fresh,
        normalizer=normalizer,
        progress=not args.quiet,
    )
    if not is_main_process():
        return
    f = result.final
    print(
        f"trained {result.crosscoder.partition.architecture.value} crosscoder: "
        f"{f['steps']} steps, FVE A {f.get('fve_a', float('nan')):.3f} / "
        f"B {f.get('fve_b', float('nan')):.3f}, L0 {f.get('l0', float('nan')):.1f}, "
        f"dead {f['dead_frac']:.1%} -> {args.out}"
    )
    partition = result.crosscoder.partition
    if "moved_to_a" in f and partition.architecture.value == "dfc":
        recycled = (
            f"; {f['recycled_to_shared']} dead exclusive features went back to shared"
            if "recycled_to_shared" in f
            else ""
        )
        print(
            f"reassigned {f['moved_to_a']} lopsided shared features to A-exclusive and "
            f"{f['moved_to_b']} to B-exclusive{recycled}; final partitions "
            f"{partition.n_a_exclusive} A-exclusive "
            f"({f.get('dead_frac_a_exclusive', float('nan')):.0%} dead), "
            f"{partition.n_b_exclusive} B-exclusive "
            f"({f.get('dead_frac_b_exclusive', float('nan')):.0%} dead), "
            f"{partition.n_shared} shared"
        )


def _training_data(args: argparse.Namespace):
    """(source, (d_a, d_b), median norms or None) from --store or --pairs."""
    if (args.store is None) == (args.pairs is None):
        raise ConfigError("give exactly one of --store (activation store) or --pairs (file)")
    if args.store is not None:
        from engine.harvest.store import ActivationStore

        store = ActivationStore(args.store)
        # The store's statistics cover every pair, not just the first batches.
        return store, (store.d_a, store.d_b), store.median_norms()
    from engine.crosscoder.pairs import load_pairs

    x_a, x_b = load_pairs(args.pairs)
    return (x_a, x_b), (x_a.shape[1], x_b.shape[1]), None


def cmd_analyze(args: argparse.Namespace) -> None:
    """Analyse every feature of a trained crosscoder into the results database."""
    from engine.analysis.analyze import analyze
    from engine.analysis.examples import ExampleConfig
    from engine.analysis.scan import ScanConfig

    result = analyze(
        args.run,
        args.store,
        args.db,
        run_id=args.run_id,
        scan_cfg=ScanConfig(top_k=args.top_k, segment_pairs=args.context_pairs),
        example_cfg=ExampleConfig(n_random=args.random),
        progress=not args.quiet,
    )
    print(result.summary())
    if args.match:
        _match(args.db, result.run_id, args.match)


def cmd_match(args: argparse.Namespace) -> None:
    """Match the features of two runs on the same model pair by decoder cosine."""
    _match(args.db, args.run_id, args.other)


def _checkpoint_path(run: dict, run_id: str) -> str:
    """The crosscoder directory a results run was analysed from, or a user error."""
    path = run.get("checkpoint_path")
    if not path:
        raise ConfigError(
            f"run {run_id!r} records no crosscoder directory; analyse it again with "
            f"`modeldiff analyze --run RUN_DIR`"
        )
    return path


def _match(db_path: Path, run_id: str, other: str, threshold: float = 0.7) -> None:
    from engine.analysis.geometry import match_runs
    from engine.crosscoder.checkpoint import load_crosscoder
    from engine.store import Database

    with Database(db_path, create=False, hold=False) as db:
        runs = {name: db.run(name) for name in (run_id, other)}  # both known, then loaded
        paths = [_checkpoint_path(run, name) for name, run in runs.items()]
        ours, theirs = (load_crosscoder(path)[0] for path in paths)
        table = match_runs(ours, theirs)
        db.write_matches(run_id, other, table)
    excl = table[table["partition"].isin(["a_exclusive", "b_exclusive"])]
    found = excl[excl["cosine"] >= threshold]
    print(
        f"matched {len(table):,} features of {run_id!r} against {other!r}: "
        f"{len(found):,} of {len(excl):,} exclusive features have a match with decoder "
        f"cosine >= {threshold} (median best cosine {table['cosine'].median():.2f})"
    )


def cmd_explain(args: argparse.Namespace) -> None:
    """Explain features (exclusive partitions first) and flag potentially harmful ones."""
    from engine.interp.run import explain_run, ordered_features
    from engine.store import Database

    with Database(args.db, create=False, hold=False) as db:
        db.run(args.run_id)  # a clear error for an unknown run
        if args.explainer == "anthropic":
            from engine.interp.anthropic.client import describe_cost, estimate_cost
            from engine.interp.anthropic.explainer import AnthropicExplainer

            explainer = AnthropicExplainer(model=args.model, batch=args.batch)
            n = len(ordered_features(db, args.run_id, args.partitions, args.limit))
            print(describe_cost(estimate_cost(n, args.model, batch=args.batch)))
            if not args.yes and input("proceed? [y/N] ").strip().lower() != "y":
                print("nothing sent")
                return
        else:
            from engine.interp.offline import OfflineExplainer, background_from

            explainer = OfflineExplainer(background_from(db.window_texts(args.run_id)))
        ledger = Path(f"{args.db}.{args.run_id}.batches.json") if args.batch else None
        run = explain_run(
            db,
            args.run_id,
            explainer,
            partitions=args.partitions,
            limit=args.limit,
            ledger=ledger,
            progress=not args.quiet,
        )
    print(f"{explainer.name}: {run.summary()}")


def cmd_score(args: argparse.Namespace) -> None:
    """Detection-score the latest explanations (10 top vs 10 random examples per feature)."""
    from engine.interp.run import score_run
    from engine.store import Database

    if args.judge == "anthropic":
        from engine.interp.anthropic.judge import AnthropicJudge

        judge = AnthropicJudge(model=args.model)
    else:
        from engine.interp.offline import OfflineJudge

        judge = OfflineJudge()
    with Database(args.db, create=False, hold=False) as db:
        db.run(args.run_id)
        run = score_run(
            db,
            args.run_id,
            judge,
            explainer=args.explainer,
            limit=args.limit,
            progress=not args.quiet,
        )
    print(f"{judge.name}: {run.summary()}")


def cmd_export(args: argparse.Namespace) -> None:
    """Export a results table (or the feature table) to Parquet or CSV."""
    from engine.store import Database

    texts = {}
    for item in args.where or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--where takes column=value, got {item!r}")
        texts[key] = value
    with Database(args.db, read_only=True, hold=False) as db:
        # Typed, so `dead=false` is False (not the true-ish string "false").
        filters = db.parse_filters(args.what, texts)
        path = db.export(args.what, args.out, run_id=args.run_id, **filters)
    print(f"wrote {path}")


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Open the dashboard on a results database (Streamlit, on this machine by default)."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("streamlit") is None:
        raise ConfigError('the dashboard needs Streamlit: pip install -e ".[app]"')
    db = args.db if args.db is not None else _env_db()
    if db is None:
        raise ConfigError("name the results database: modeldiff dashboard --db results.duckdb")
    if not db.is_file():
        raise ConfigError(
            f"no results database at {db}; create one with `modeldiff analyze --run RUN "
            f"--store STORE --db {db}` (see docs/analysis.md)"
        )
    if not is_loopback(args.host):
        print(
            f"warning: --host {args.host} serves the dashboard, which can write triage and "
            "run models, to other machines on the network, with no login; use 127.0.0.1 "
            "unless they are trusted",
            file=sys.stderr,
        )
    command = dashboard_command(db.resolve(), args.host, args.port)
    print(f"modeldiff dashboard on http://{args.host}:{args.port} (Ctrl-C stops it)")
    try:
        return subprocess.call(command)
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


def dashboard_command(db: Path, host: str = "127.0.0.1", port: int = 8501) -> list[str]:
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


def cmd_steer(args: argparse.Namespace) -> None:
    """Generate with a feature added to a model: the baseline and each steering strength."""
    from engine.cli_verify import generation_settings
    from engine.steering.run import steer_feature
    from engine.store import Database

    cfg = generation_settings(args, greedy_default=True)
    with Database(args.db, create=False, hold=False) as db:
        result = steer_feature(
            db, args.run_id, args.feature, args.prompt, model=args.model, alphas=args.alphas,
            cfg=cfg, positions=args.positions, save=args.save, author=args.author,
        )  # fmt: skip
    note = ""
    if result.transfer:
        note = (
            f" (no decoder in model {args.model.upper()}: translated through the shared partition)"
        )
    print(
        f"feature {result.feature_id} steering model {result.model.upper()}{note}, "
        f"s_max {result.s_max:.3g}\n"
    )
    print(f"baseline: {result.baseline.strip()}\n")
    for alpha, text in zip(result.alphas, result.steered, strict=True):
        print(f"alpha {alpha:g}: {text.strip()}\n")
    if result.sample_ids:
        print(f"saved {len(result.sample_ids)} samples to {args.db}")


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
    demo = run_demo(out, DemoSettings(progress=not args.quiet))
    print(f"demo finished in {demo.timings['total']['seconds']:.0f} s; results in {demo.db}")
    if args.no_dashboard:
        print(f"open it with: modeldiff dashboard --db {demo.db}")
        return 0
    print(f"dashboard: {dashboard_url(args.host, args.port)}")
    args.db = demo.db
    return cmd_dashboard(args)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="modeldiff",
        description="Cross-architecture model diffing with Dedicated Feature Crosscoders.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("harvest", help=cmd_harvest.__doc__, description=cmd_harvest.__doc__)
    p.add_argument("--out", required=True, type=Path, help="store directory (resumed if present)")
    p.add_argument("--config", type=Path, default=None, help="run TOML with a [harvest] table")
    p.add_argument("--model-a", help="demo name (smollm2, gemma3), hub id, directory or .gguf")
    p.add_argument("--model-b", help="as --model-a")
    p.add_argument("--layer-a", help="layer index, negative index, or 'middle'")
    p.add_argument("--layer-b", help="as --layer-a")
    p.add_argument(
        "--sources",
        nargs="+",
        help="text sources: demo:chitchat demo:pydoc demo:kjv fineweb lmsys or file paths",
    )
    p.add_argument(
        "--weights", nargs="+", type=non_negative_float, help="share of each source (characters)"
    )
    p.add_argument("--max-pairs", type=positive_int, help="stop after this many aligned pairs")
    p.add_argument("--context-length", type=positive_int, help="tokens per window per model")
    p.add_argument("--batch-tokens", type=positive_int, help="padded tokens per forward pass")
    p.add_argument("--store-dtype", help="float32 | bfloat16 | float16")
    p.add_argument("--model-dtype", help="auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--alignment", help="offsets (default) | windows (the paper's Algorithm 1)")
    p.add_argument("--fresh", action="store_true", help="discard an existing store in --out")
    p.add_argument(
        "--rank",
        type=non_negative_int,
        help="this process's share of a split harvest (default $RANK or 0)",
    )
    p.add_argument(
        "--world-size",
        type=positive_int,
        help="processes sharing the harvest (default $WORLD_SIZE or 1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_harvest)

    p = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    config = p.add_mutually_exclusive_group(required=True)
    config.add_argument(
        "--config", type=Path, help="run TOML ([crosscoder], [train]) or a preset name"
    )
    config.add_argument(
        "--preset", help="shipped settings: demo, paper-llama-qwen, paper-gptoss-deepseek"
    )
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--store", type=Path, help="activation store from modeldiff harvest")
    data.add_argument(
        "--pairs", type=Path, help="safetensors file with tensors 'a' [n, d_a] and 'b' [n, d_b]"
    )
    p.add_argument("--out", required=True, type=Path, help="run directory (resumed if present)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in --out")
    p.add_argument("--steps", type=positive_int, default=None, help="override [train] steps")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="override [train] batch_size"
    )
    p.add_argument("--device", default=None, help="override [train] device (auto|cpu|cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("analyze", help=cmd_analyze.__doc__, description=cmd_analyze.__doc__)
    p.add_argument("--run", required=True, type=Path, help="run directory of modeldiff train")
    p.add_argument("--store", required=True, type=Path, help="the activation store it used")
    p.add_argument("--db", required=True, type=Path, help="DuckDB results file (created)")
    p.add_argument(
        "--run-id", type=run_id, help="name of the run in the database (default: the run dir)"
    )
    p.add_argument(
        "--top-k", type=positive_int, default=20, help="max-activating contexts per feature"
    )
    p.add_argument(
        "--random", type=non_negative_int, default=10, help="non-activating contexts per feature"
    )
    p.add_argument(
        "--context-pairs",
        type=positive_int,
        default=32,
        help="aligned tokens per context (default 32)",
    )
    p.add_argument(
        "--match", type=run_id, metavar="RUN_ID", help="also match features against this run"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("match", help=cmd_match.__doc__, description=cmd_match.__doc__)
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--run-id", required=True, type=run_id)
    p.add_argument("--other", required=True, type=run_id, help="run id of the other run")
    p.set_defaults(func=cmd_match)

    for name, func in (("explain", cmd_explain), ("score", cmd_score)):
        p = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
        p.add_argument("--db", required=True, type=Path)
        p.add_argument("--run-id", required=True, type=run_id)
        who = "explainer" if name == "explain" else "judge"
        p.add_argument(
            f"--{who}",
            choices=("offline", "anthropic"),
            default="offline",
            help="offline (no key, deterministic) or anthropic (needs ANTHROPIC_API_KEY)",
        )
        p.add_argument("--model", default="claude-opus-4-1-20250805", help="Claude model")
        p.add_argument("--limit", type=positive_int, help="at most this many features")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "explain":
            p.add_argument("--partitions", nargs="+", help="only these partitions")
            p.add_argument("--batch", action="store_true", help="Message Batches API (50%% off)")
            p.add_argument("--yes", action="store_true", help="do not ask before paid calls")
        else:
            p.add_argument(
                "--explainer",
                dest="explainer",
                default=None,
                help="score explanations of this explainer (default: the latest)",
            )
        p.set_defaults(func=func)

    p = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--what", required=True, help="a table name, or feature_table")
    p.add_argument("--out", required=True, type=Path, help="a .parquet or .csv path")
    p.add_argument("--run-id", type=run_id, help="only this run's rows")
    p.add_argument("--where", nargs="+", metavar="COLUMN=VALUE", help="equality filters")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("dashboard", help=cmd_dashboard.__doc__, description=cmd_dashboard.__doc__)
    p.add_argument("--db", type=Path, help="DuckDB results file (default: $MODELDIFF_DB)")
    p.add_argument("--port", type=port, default=8501, help="port (default 8501)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("steer", help=cmd_steer.__doc__, description=cmd_steer.__doc__)
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--run-id", required=True, type=run_id)
    p.add_argument("--feature", required=True, type=non_negative_int)
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", choices=("a", "b"), default="a", help="the model to steer")
    p.add_argument(
        "--alphas",
        nargs="+",
        type=finite_float,
        default=[0.0, 2.0, 4.0, 6.0, 8.0, 10.0],
        help="strengths in units of the feature's s_max",
    )
    p.add_argument("--positions", choices=("all", "prompt", "generated"), default="all")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument(
        "--temperature", type=non_negative_float, default=0.0, help="0: greedy (default)"
    )
    p.add_argument("--seed", type=any_int, default=0)
    p.add_argument("--save", action="store_true", help="record the samples in the database")
    p.add_argument("--author", default="", help="who made the samples (saved with them)")
    p.set_defaults(func=cmd_steer)

    from engine.cli_verify import add_parsers as add_verify_parsers

    add_verify_parsers(sub)

    from engine.planted.cli import add_parser as add_planted_parser

    add_planted_parser(sub)

    # Its options belong to the sweep's own parser (see `modeldiff toy --help`).
    p = sub.add_parser("toy", help=cmd_toy.__doc__, add_help=False)
    p.set_defaults(func=cmd_toy)

    p = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--no-dashboard", action="store_true", help="stop after the pipeline")
    p.add_argument("--host", default="127.0.0.1", help="dashboard address (default localhost)")
    p.add_argument("--port", type=port, default=8501)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    return parser


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `modeldiff` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Schedulers stop jobs with SIGTERM: treat it like Ctrl-C, which saves a checkpoint.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    if args.command == "toy":
        args.toy_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        status = args.func(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
