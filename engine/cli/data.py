"""`modeldiff harvest | train | analyze | match`: from two models to a results database."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine import stages
from engine.categories import EXCLUSIVE, MATCH_COSINE
from engine.cli.types import non_negative_float, non_negative_int, positive_int, run_id
from engine.config import HarvestConfig, RunConfig, load_run_config
from engine.errors import ConfigError


def cmd_harvest(args: argparse.Namespace) -> None:
    """Harvest aligned activation pairs of two models into an activation store."""
    from engine.harvest.pipeline import summary

    base = load_run_config(args.config).harvest if args.config else HarvestConfig()
    cfg = stages.with_options(base, vars(args))  # the flags named like [harvest] settings
    rank, world_size = _harvest_rank(args)
    result = stages.harvest(
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
    """Train a crosscoder on paired activations: an activation store, a pairs file, or a
    stream computed live from the two models (--stream).

    Under `torchrun --nproc-per-node N` the N processes split every batch (data parallel).
    """
    from engine.config import load_preset, preset_names
    from engine.crosscoder.distributed import is_main_process

    # Fail on a bad config name before reading any activations.
    if args.preset is not None:
        load_preset(args.preset)
    elif not args.config.is_file() and str(args.config) not in preset_names():
        load_run_config(args.config)  # raises "config file not found", listing the presets
    stream = None
    if args.stream is not None:  # the run directory checked and the models loaded
        stream = stages.stream_run(
            args.stream, args.out, options=vars(args), fresh=args.fresh, progress=not args.quiet
        )
        dims = stream.dims
    else:
        data = stages.training_data(store=args.store, pairs=args.pairs)
        dims = data.dims
    if args.preset is not None:
        cfg: RunConfig = load_preset(args.preset, dims)
    else:
        cfg = load_run_config(args.config, dims)
    if cfg.crosscoder is None:
        raise ConfigError(f"{args.config} has no [crosscoder] section")
    cfg.train = stages.with_options(cfg.train, vars(args))  # --steps, --batch-size, --device
    if stream is not None:  # the analysis store harvested, then the live source
        data = stages.streaming_data(stream, cfg.train.batch_size)
    # With --fresh, train clears the run directory once the config and data are known good
    # (a typo must not cost the run), and refuses a folder that is not a training run.
    result = stages.train(cfg, data, args.out, resume=not args.fresh, progress=not args.quiet)
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


def cmd_analyze(args: argparse.Namespace) -> None:
    """Analyse every feature of a trained crosscoder into the results database."""
    result = stages.analyze(
        args.run, args.store, args.db, run_id=args.run_id, top_k=args.top_k,
        segment_pairs=args.context_pairs, n_random=args.random, progress=not args.quiet,
    )  # fmt: skip
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


def _match(db_path: Path, run_id: str, other: str, threshold: float = MATCH_COSINE) -> None:
    from engine.analysis.geometry import match_runs
    from engine.crosscoder.checkpoint import load_crosscoder
    from engine.results import Database

    with Database(db_path, create=False, hold=False) as db:
        runs = {name: db.run(name) for name in (run_id, other)}  # both known, then loaded
        paths = [_checkpoint_path(run, name) for name, run in runs.items()]
        ours, theirs = (load_crosscoder(path)[0] for path in paths)
        table = match_runs(ours, theirs)
        db.write_matches(run_id, other, table)
    excl = table[table["partition"].isin(EXCLUSIVE)]
    found = excl[excl["cosine"] >= threshold]
    print(
        f"matched {len(table):,} features of {run_id!r} against {other!r}: "
        f"{len(found):,} of {len(excl):,} exclusive features have a match with decoder "
        f"cosine >= {threshold} (median best cosine {table['cosine'].median():.2f})"
    )


# -- parsers: a flag left out is None, so the config's (or the stage's) default applies --------


def add_harvest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("harvest", help=cmd_harvest.__doc__, description=cmd_harvest.__doc__)
    p.add_argument("--out", required=True, type=Path, help="store directory (resumed if present)")
    p.add_argument("--config", type=Path, default=None, help="run TOML with a [harvest] table")
    # Each of these is the [harvest] setting of the same name (HarvestConfig).
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
    p.add_argument(
        "--answer-pairs",
        action="store_const",
        const=True,
        help="also pair each chat model's answer header, where it decides how to answer",
    )
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


def add_train(sub: argparse._SubParsersAction) -> None:
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
    data.add_argument(
        "--stream",
        metavar="HARVEST_CONFIG",
        help="train on activations computed live: a harvest TOML or preset ([harvest] and "
        "[stream] tables); its first analysis_pairs pairs go to OUT/store, held out",
    )
    p.add_argument("--out", required=True, type=Path, help="run directory (resumed if present)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints in --out")
    # Each of these is the [train] setting of the same name (TrainConfig).
    p.add_argument("--steps", type=positive_int, default=None, help="override [train] steps")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="override [train] batch_size"
    )
    p.add_argument("--device", default=None, help="override [train] device (auto|cpu|cuda)")
    # With --stream: the [stream] settings of the same name (StreamConfig).
    p.add_argument(
        "--analysis-pairs", type=positive_int, help="--stream: pairs kept in OUT/store (20,000)"
    )
    p.add_argument(
        "--buffer-pairs",
        type=positive_int,
        help="--stream: pairs per shuffled block, a multiple of the batch size (65,536)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def add_analyze(sub: argparse._SubParsersAction) -> None:
    from engine.defaults import SEGMENT_PAIRS

    p = sub.add_parser("analyze", help=cmd_analyze.__doc__, description=cmd_analyze.__doc__)
    p.add_argument(
        "--run", required=True, help="run directory of modeldiff train, or hf://OWNER/NAME (Hub)"
    )
    p.add_argument(
        "--store",
        type=Path,
        help="the activation store it used (default for a --stream run: its RUN/store)",
    )
    p.add_argument("--db", required=True, type=Path, help="DuckDB results file (created)")
    p.add_argument(
        "--run-id", type=run_id, help="name of the run in the database (default: the run dir)"
    )
    p.add_argument("--top-k", type=positive_int, help="max-activating contexts per feature")
    p.add_argument("--random", type=non_negative_int, help="non-activating contexts per feature")
    p.add_argument(
        "--context-pairs",
        type=positive_int,
        help=f"aligned tokens per context (default {SEGMENT_PAIRS})",
    )
    p.add_argument(
        "--match", type=run_id, metavar="RUN_ID", help="also match features against this run"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)


def add_match(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("match", help=cmd_match.__doc__, description=cmd_match.__doc__)
    p.add_argument("--db", required=True, type=Path)
    p.add_argument("--run-id", required=True, type=run_id)
    p.add_argument("--other", required=True, type=run_id, help="run id of the other run")
    p.set_defaults(func=cmd_match)
