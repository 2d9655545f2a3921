"""`modeldiff push | import-paper | export-paper`: runs shared on the Hugging Face Hub, and
crosscoders in the format of the paper's published code.

Every command that reads a run takes a run directory or a Hub location hf://OWNER/NAME
(`engine.hub`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_push(args: argparse.Namespace) -> None:
    """Upload a trained run to a Hugging Face Hub model repository with a model card."""
    from engine.hub import HubError, push_run

    if args.token is not None:  # refused: a token typed on the command line stays in history
        raise HubError(
            "--token on the command line is kept in the shell's history; export HF_TOKEN=... "
            "or run `hf auth login` instead"
        )
    data = None
    if args.store is not None:
        from engine.activations.reader import read_manifest

        data = read_manifest(args.store).get("data")
    url = push_run(args.run, args.repo, data=data, private=not args.public, revision=args.revision)
    visibility = "public" if args.public else "private unless it already existed public"
    print(f"pushed {args.run} to hf://{args.repo.removeprefix('hf://')} ({visibility}; {url})")


def cmd_import_paper(args: argparse.Namespace) -> None:
    """Convert a crosscoder saved by the paper's code (dictionary_learning's DFC fork) into
    a modeldiff run directory."""
    from engine.crosscoder.paper_format import import_paper

    models = None
    if args.store is not None:
        from engine.activations.reader import read_manifest

        models = read_manifest(args.store).get("models")
    done = import_paper(args.source, args.out, models=models)
    p = done.partition
    scaling = (
        "its input normaliser became the scale factors (mean folded into the biases)"
        if done.normalised
        else "no input normalisation (unit scale factors)"
    )
    print(
        f"imported a {p.architecture.value} crosscoder (d={done.d}, {p.n_features} features: "
        f"{p.n_a_exclusive} A-exclusive, {p.n_b_exclusive} B-exclusive, {p.n_shared} shared; "
        f"k={done.k}; {scaling}) -> {done.out}"
    )
    if done.threshold < 0:
        print(
            "note: its inference threshold was never learned (training stopped before the "
            "paper's threshold_start_step), so every feature with a positive pre-activation "
            "is active on its own tokens"
        )


def cmd_export_paper(args: argparse.Namespace) -> None:
    """Write a run's crosscoder in the format of the paper's code (model.safetensors and
    config.json of DedicatedFeatureBatchTopKCrossCoder); needs d_A == d_B."""
    from engine.crosscoder.paper_format import export_paper

    done = export_paper(args.run, args.out)
    p = done.partition
    print(
        f"exported {p.n_features} features ({p.n_a_exclusive} A-exclusive, "
        f"{p.n_b_exclusive} B-exclusive, {p.n_shared} shared; d={done.d}, k={done.k}) "
        f"-> {done.out}"
    )


def add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help=cmd_push.__doc__, description=cmd_push.__doc__)
    p.add_argument("run", help="run directory of modeldiff train (or hf://OWNER/NAME)")
    p.add_argument("--repo", required=True, help="Hub model repository OWNER/NAME (created)")
    p.add_argument(
        "--store", type=Path, help="the activation store it was trained on (data sources)"
    )
    p.add_argument(
        "--public", action="store_true",
        help="create the repository public (default: private); the token is HF_TOKEN's or "
        "the login's (`hf auth login`)",
    )  # fmt: skip
    p.add_argument("--private", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--revision", help="branch to commit to (default main)")
    p.add_argument("--token", help=argparse.SUPPRESS)  # refused, with the way to give one
    p.set_defaults(func=cmd_push)


def add_import_paper(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-paper", help=cmd_import_paper.__doc__, description=cmd_import_paper.__doc__
    )
    p.add_argument(
        "source", help="its save folder, model_final.pt / checkpoint_N.pt, a folder with "
        "model.safetensors + config.json, or such a folder on the Hub (hf://OWNER/NAME)",
    )  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="run directory to write")
    p.add_argument(
        "--store", type=Path, help="activation store of the same model pair (records the models)"
    )
    p.set_defaults(func=cmd_import_paper)


def add_export_paper(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-paper", help=cmd_export_paper.__doc__, description=cmd_export_paper.__doc__
    )
    p.add_argument("run", help="run directory of modeldiff train (or hf://OWNER/NAME)")
    p.add_argument("--out", required=True, type=Path, help="folder to write (not a modeldiff run)")
    p.set_defaults(func=cmd_export_paper)
