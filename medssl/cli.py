"""The ``medssl`` console script: parse arguments, then call a typed function a Python user can call too.

User errors (:class:`medssl.errors.MedsslError`) print ``medssl: error: <file>: <problem>`` (one line per
problem) and exit with code 2; anything else is a bug and keeps its traceback. ``medssl infer`` on several files
or folders segments every good volume, prints one such line per bad one (as it fails, no output left for it), the
summary (``N of M volumes segmented; K failed``) on stdout, and exits with code 2 when any volume failed.

Output discipline: results go to stdout; progress ("k/N" with ETA, :mod:`medssl.progress`) and medssl's INFO lines
go to stderr only when it is a terminal or with ``--verbose`` (DEBUG too), ``--quiet`` leaves errors only
(:func:`log_level`); the error lines are printed last, so they end stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence

from medssl.errors import ConfigError, MedsslError

__all__ = ["main", "build_parser", "log_level", "TYPICAL_SESSION"]

EXIT_USER_ERROR = 2


# the five commands of a typical session, the end of `medssl --help`
TYPICAL_SESSION = (
    "medssl phantom ct-abdomen --out data/ct_phantom --cases 6 --unlabeled 4",
    "python -m monai.bundle run training --config_file "
    "\"['bundles/supervised.yaml','bundles/btcv_unetr.yaml','bundles/tiny.yaml']\"",
    "medssl inspect runs/btcv_unetr/model.pt",
    "medssl infer --model runs/btcv_unetr/model.pt --input data/ct_phantom/imagesTr --output runs/infer",
    "medssl evaluate --pred runs/infer --ref data/ct_phantom/datalist.json --out runs/metrics.csv",
)

_EPILOG = (
    "a typical session: make or prepare data, train a bundle (drop bundles/tiny.yaml for the published recipe; "
    "real data:\n`medssl prepare btcv --root /data/RawData --out data/btcv.json` and --dataset_dir / --datalist), "
    "look at the model,\nsegment, score. --verbose / --quiet work before or after COMMAND.\n  "
    + "\n  ".join(TYPICAL_SESSION)
)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks and appends ``(default: X)`` to options whose help does not state one."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        # identity, not equality: 0 is a default worth stating, False (a flag's off state) is not
        unset = any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if action.option_strings and not unset and "default" not in help_:
            help_ += " (default: %(default)s)"
        return help_


def _output_options() -> argparse.ArgumentParser:
    """``--verbose`` / ``--quiet`` for every subcommand; SUPPRESS keeps a value given before the command."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="progress ('k/N', ETA) and INFO lines on stderr even when it is not a terminal; DEBUG lines too",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress and no log lines below ERROR, even on a terminal; errors and results still print",
    )
    return parent


def _add(sub, name: str, help_: str, example: str, func: Callable[[argparse.Namespace], int | None]):
    p = sub.add_parser(
        name,
        help=help_,
        description=help_,
        epilog=f"example:\n  {example}",
        formatter_class=_HelpFormatter,
        parents=[_output_options()],
    )
    p.set_defaults(func=func)
    return p


# ---------------------------------------------------------------------------------------------- commands


def _cmd_phantom(args: argparse.Namespace) -> int:
    from medssl.data.phantoms import generate_phantom_dataset

    datalist = generate_phantom_dataset(
        args.kind,
        args.out,
        cases=args.cases,
        unlabeled=args.unlabeled,
        seed=args.seed,
        shape=args.shape,
        organs=args.organs,
    )
    print(datalist)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from medssl.data.prepare import prepare_dataset

    out = prepare_dataset(
        args.dataset, args.root, args.out, split=args.split, protocol=args.protocol, crop_seed=args.crop_seed
    )
    print(out)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from medssl.data.datalist import check_datalist

    report = check_datalist(args.datalist, dataset_dir=args.dataset_dir, keys=args.keys)
    print(report)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from medssl.checkpoint import describe_checkpoint, load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    print(describe_checkpoint(ckpt))
    if args.into:
        from medssl.networks.pretrained import load_into_bundle

        report = load_into_bundle(args.checkpoint, args.into, allow_partial=args.allow_partial)
        print(report.format())
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from medssl.metrics import evaluate_folder

    summary = evaluate_folder(
        args.pred, args.ref, args.out, dataset_dir=args.dataset_dir, key=args.key, convention=args.convention
    )
    print(summary)
    print(f"convention: {args.convention}")
    return 0


def _print_error(error: MedsslError) -> None:
    for line in str(error).splitlines():
        print(f"medssl: error: {line}", file=sys.stderr, flush=True)


def _cmd_infer(args: argparse.Namespace) -> int:
    from medssl.inference import infer

    # every volume is tried: a bad one prints its one error line at once and leaves no output, the good ones are
    # written; the summary goes to stdout and any failure makes the exit code 2
    report = infer(
        args.model,
        args.input,
        args.output,
        device=args.device,
        precision=args.precision,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        mode=args.mode,
        probabilities=args.probabilities,
        largest_component=args.largest_component,
        interpolation=args.interpolation,
        progress=not args.no_progress,
        raise_on_error=False,
        on_error=_print_error,
    )
    print(report.summary())
    return EXIT_USER_ERROR if report.failures else 0


def _cmd_export(args: argparse.Namespace) -> int:
    from medssl.export import export_state_dict, export_torchscript

    if not (args.torchscript or args.state_dict):
        raise ConfigError("medssl export", "nothing to write: give --torchscript FILE and/or --state-dict FILE")
    if args.torchscript:
        print(export_torchscript(args.checkpoint, args.torchscript))
    if args.state_dict:
        print(export_state_dict(args.checkpoint, args.state_dict))
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from medssl.study import StudyConfig, run_study

    cli = {
        "datalist": args.datalist,
        "out": args.out,
        "labeled": args.labeled,
        "methods": args.methods,
        "seeds": args.seeds,
        "budget": args.budget,
        "dataset_dir": args.dataset_dir,
        "pretrained": args.pretrained,
        "pretrain_bundle": args.pretrain_bundle,
        "task": args.task,
        "overlays": args.overlay,
        "device": args.device,
        "precision": args.precision,
        "val_interval": args.val_interval,
        "jobs": args.jobs,
        "threads": args.threads,
        "redo_changed": args.redo_changed,
        "acquisition": args.acquisition,
        "rounds": args.rounds,
        "step": args.step,
        "diversity": args.diversity,
    }
    if args.acquisition and not args.methods and not args.config:
        cli["methods"] = ["scratch"]  # the acquisition study trains one method: fine-tuning from scratch by default
    if args.config:
        cfg = StudyConfig.from_yaml(args.config, **cli)
    else:
        missing = [f"--{k}" for k in ("datalist", "out") if cli[k] is None]
        if missing:
            raise ConfigError(None, f"study needs {' and '.join(missing)} (or --config STUDY.yaml)")
        cfg = StudyConfig(**{k: v for k, v in cli.items() if v is not None})
    if cfg.acquisition:
        from medssl.study_acquisition import run_acquisition

        paths = run_acquisition(cfg)
    else:
        paths = run_study(cfg)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _cmd_suggest(args: argparse.Namespace) -> int:
    from medssl.suggest import suggest

    paths = suggest(
        args.model,
        args.datalist,
        args.out,
        count=args.count,
        strategy=args.strategy,
        teacher=args.teacher,
        key=args.key,
        dataset_dir=args.dataset_dir,
        diversity=args.diversity,
        samples=args.samples,
        seed=args.seed,
        write_datalist=args.write_datalist,
        cache=not args.no_cache,
        device=args.device,
        precision=args.precision,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
    )
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    from medssl import __version__

    parser = argparse.ArgumentParser(
        prog="medssl",
        description="Label-efficient 3D medical image segmentation on MONAI.",
        formatter_class=_HelpFormatter,
        epilog=_EPILOG,
        parents=[_output_options()],
    )
    parser.add_argument("--version", action="version", version=f"medssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _add(
        sub,
        "phantom",
        "write a deterministic synthetic dataset (CT abdomen with 13 BTCV organs, or LA MRI) and its datalist",
        "medssl phantom ct-abdomen --out data/ct_phantom --cases 6 --unlabeled 4 --seed 0",
        _cmd_phantom,
    )
    p.add_argument("kind", choices=["ct-abdomen", "la-mri"], help="which phantom")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--cases", type=int, default=6, help="labeled cases (default: 6)")
    p.add_argument("--unlabeled", type=int, default=4, help="unlabeled cases (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"), help="volume shape in voxels")
    p.add_argument(
        "--organs",
        nargs="+",
        metavar="ORGAN",
        help="ct-abdomen: label only these organs (BTCV names with _ for spaces, or 1-13), renumbered 1..K; "
        "the others become background (default: all 13)",
    )

    p = _add(
        sub,
        "prepare",
        "write a Decathlon-format datalist for a real dataset folder (BTCV, TCIA-COVID19, LA 2018)",
        "medssl prepare btcv --root /data/RawData --out data/btcv.json --split init_6",
        _cmd_prepare,
    )
    p.add_argument("dataset", choices=["btcv", "tcia", "la2018"], help="dataset layout")
    p.add_argument("--root", required=True, help="the dataset's raw folder")
    p.add_argument("--out", required=True, help="datalist JSON to write")
    p.add_argument("--split", default=None, help="reference split to apply (default: the dataset's full split)")
    # no argparse choices: a bad value is one "medssl: error:" line, like every other user error
    p.add_argument(
        "--protocol",
        default=None,
        help="la2018 only: full (default; whole scans as stored) or uamt, UA-MT's published preprocessing "
        "(MICCAI 2019): every volume z-scored and cropped in-plane around its OWN ground-truth atrium, test cases "
        "included. OPTIMISTIC, the crop uses the answer: only for comparing with numbers published that way; "
        "write it into its own folder",
    )
    p.add_argument("--crop-seed", type=int, default=0, help="uamt: seed of the random crop margins (default: 0)")

    p = _add(
        sub,
        "check",
        "validate a datalist: files exist and parse, 3D, image/label agree in shape and affine, labels in range",
        "medssl check data/ct_phantom/datalist.json",
        _cmd_check,
    )
    p.add_argument("datalist", help="Decathlon-format datalist JSON")
    p.add_argument("--dataset-dir", default=None, help="base of relative paths (default: the datalist's folder)")
    p.add_argument("--keys", nargs="+", default=None, help="datalist keys to check (default: all present)")

    p = _add(
        sub,
        "inspect",
        "print a checkpoint's metadata; with --into, the report of loading its ViT into a bundle's network",
        "medssl inspect runs/ssl/model.pt --into bundles/btcv_unetr.yaml",
        _cmd_inspect,
    )
    p.add_argument("checkpoint", help="a medssl checkpoint (.pt)")
    p.add_argument("--into", default=None, help="bundle config whose network_def receives the weights")
    p.add_argument("--allow-partial", action="store_true", help="report instead of failing on missing tensors")

    p = _add(
        sub,
        "evaluate",
        "score predicted label maps against references: Dice, Jaccard, HD95 and ASD (mm) per case and class",
        "medssl evaluate --pred runs/infer --ref data/ct_phantom/datalist.json --out runs/metrics.csv",
        _cmd_evaluate,
    )
    p.add_argument("--pred", required=True, help="folder of <name>_seg.nii.gz predictions")
    p.add_argument("--ref", required=True, help="datalist JSON or folder of reference label maps")
    p.add_argument("--out", required=True, help="CSV to write (a Markdown summary is written beside it)")
    p.add_argument("--dataset-dir", default=None, help="base of the datalist's relative paths")
    p.add_argument("--key", default="validation", help="datalist key holding the references (default: validation)")
    p.add_argument(
        "--convention",
        choices=("organs", "tutorial"),
        default="organs",
        help="organs: mean Dice of the foreground classes (medssl's primary number; default); tutorial: also the "
        "MONAI BTCV UNETR tutorial's number, DiceMetric(include_background=True) averaged over all classes with "
        "background, beside it (compare with predictions made at the tutorial's sliding-window overlap 0.25)",
    )

    p = _add(
        sub,
        "infer",
        "segment NIfTI / NRRD / MHA scans (or folders of them) with a checkpoint; labels on exactly the input grid",
        "medssl infer --model runs/btcv_unetr/model.pt --input data/ct_phantom/imagesTr --output runs/infer",
        _cmd_infer,
    )
    p.add_argument("--model", required=True, help="medssl checkpoint (model.pt); preprocessing and roi come from it")
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="image files and/or folders of images; a bad one gets one error line and no output, the others are "
        "still segmented (exit code 2 if any failed)",
    )
    p.add_argument("--output", required=True, help="folder for <name>_seg.nii.gz (+ .json sidecar)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32", "amp"],
        default="auto",
        help="auto: bf16 where this hardware runs it fast, else fp32 (CPU) / amp (CUDA) (default: auto)",
    )
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1) (default: 0.25)")
    p.add_argument("--sw-batch-size", type=int, default=4, help="windows per network call (default: 4)")
    p.add_argument("--mode", choices=["gaussian", "constant"], default="gaussian", help="window blending")
    p.add_argument("--probabilities", action="store_true", help="also write <name>_prob.nii.gz (X, Y, Z, C)")
    p.add_argument("--largest-component", action="store_true", help="keep each class's largest component")
    p.add_argument(
        "--interpolation",
        choices=["linear", "nearest"],
        default="linear",
        help="labels back to the input grid: linear probabilities on boundaries (default) or nearest labels",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = _add(
        sub,
        "export",
        "export a checkpoint's network as TorchScript with its preprocessing and labels attached, or as the bare "
        "state dict MONAI's CheckpointLoader and monai.bundle.load read",
        "medssl export runs/btcv_unetr/model.pt --torchscript runs/btcv_unetr/model.ts --state-dict "
        "runs/btcv_unetr/model_sd.pt",
        _cmd_export,
    )
    p.add_argument("checkpoint", help="a medssl checkpoint (.pt)")
    p.add_argument("--torchscript", default=None, help="TorchScript file to write")
    p.add_argument("--state-dict", default=None, help="bare state dict file to write (tensors only, weights_only)")

    p = _add(
        sub,
        "study",
        "label-efficiency study: methods x labeled counts x seeds through the bundles, with a table and a plot",
        "medssl study --datalist data/ct_phantom/datalist.json --labeled 2 4 --methods scratch pretrained "
        "mean_teacher --pretrained runs/ssl_pretrain/model.pt --seeds 2 --budget 200 --out runs/study "
        "--overlay bundles/tiny.yaml",
        _cmd_study,
    )
    p.add_argument("--config", default=None, help="study YAML (keys of medssl.study.StudyConfig); flags override it")
    p.add_argument("--datalist", default=None, help="datalist with training (labeled pool) and validation items")
    p.add_argument("--dataset-dir", default=None, help="base of the datalist's relative paths")
    p.add_argument("--labeled", type=int, nargs="+", default=None, help="labeled counts (default: 2 4 8)")
    p.add_argument("--methods", nargs="+", default=None, help="scratch pretrained mean_teacher pretrained_mean_teacher")
    p.add_argument("--pretrained", default=None, help="pretrained ViT checkpoint for the pretrained* methods")
    p.add_argument("--pretrain-bundle", nargs="+", default=None, help="bundle config(s) to pretrain one instead")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3)")
    p.add_argument("--budget", type=int, default=None, help="training iterations per run (default: 1000)")
    p.add_argument("--task", choices=["btcv", "la"], default=None, help="default: from the datalist's labels")
    p.add_argument("--overlay", nargs="+", default=None, help="bundle overlays for every run, e.g. bundles/tiny.yaml")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: auto)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32", "amp"], default=None, help="default: auto")
    p.add_argument("--val-interval", type=int, default=None, help="validation interval (default: the bundles')")
    p.add_argument("--jobs", type=int, default=None, help="cells trained at once, one process each (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: CPU count / jobs)")
    p.add_argument("--out", default=None, help="output folder; rerunning resumes it")
    p.add_argument(
        "--redo-changed",
        action="store_true",
        default=None,
        help="recompute the cells whose settings changed since they ran (default: refuse to mix settings)",
    )
    p.add_argument(
        "--acquisition",
        nargs="+",
        default=None,
        help="active-learning rounds instead of the label grid: strategies to compare, e.g. random entropy "
        "(round 0 = the smallest --labeled count; one method, default scratch)",
    )
    p.add_argument("--rounds", type=int, default=None, help="acquisition rounds after round 0 (default: 2)")
    p.add_argument("--step", type=int, default=None, help="volumes annotated per acquisition round (default: 1)")
    p.add_argument("--diversity", type=float, default=None, help="acquisition selection diversity (default: 0.5)")
    p = _add(
        sub,
        "suggest",
        "rank unlabeled volumes by which to annotate next (entropy, mc_dropout, teacher_student or random), with "
        "diversity; writes suggestions.csv and a PNG of the most uncertain slices",
        "medssl suggest --model runs/mean_teacher/model_student.pt --teacher runs/mean_teacher/last.pt "
        "--strategy teacher_student --datalist data/ct_phantom/datalist.json --count 4 --out runs/suggest "
        "--write-datalist data/ct_phantom/next.json",
        _cmd_suggest,
    )
    p.add_argument("--model", required=True, help="medssl checkpoint (model.pt); preprocessing and roi come from it")
    p.add_argument("--datalist", required=True, help="datalist whose --key items are scored (never modified)")
    p.add_argument("--count", type=int, required=True, help="how many volumes to suggest")
    p.add_argument("--out", required=True, help="output folder (suggestions.csv, suggestions.png, score cache)")
    # no argparse choices: a bad value is one "medssl: error:" line, like every other user error
    p.add_argument(
        "--strategy",
        default="entropy",
        help="entropy (mean softmax entropy over the foreground-probable voxels; default), mc_dropout (mutual "
        "information over --samples dropout passes), teacher_student (KL(teacher || student), needs --teacher) "
        "or random (seeded control)",
    )
    p.add_argument("--teacher", default=None, help="teacher_student: Mean Teacher last.pt or model_teacher.pt")
    p.add_argument("--key", default="unlabeled", help="datalist key of the candidates (default: unlabeled)")
    p.add_argument("--dataset-dir", default=None, help="base of the datalist's relative paths")
    p.add_argument(
        "--diversity",
        type=float,
        default=0.5,
        help="weight of the similarity penalty in the greedy selection; 0 = plain ranking (default: 0.5)",
    )
    p.add_argument("--samples", type=int, default=8, help="mc_dropout passes (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of random and of mc_dropout's masks (default: 0)")
    p.add_argument(
        "--write-datalist",
        default=None,
        metavar="NEW.json",
        help="also write a copy of the datalist with the suggested cases moved from --key to 'to_label'",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the per-volume score cache")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32", "amp"], default="auto", help="default: auto")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1) (default: 0.25)")
    p.add_argument("--sw-batch-size", type=int, default=4, help="windows per network call (default: 4)")
    return parser


def log_level(verbose: bool, quiet: bool) -> int:
    """The level of medssl's log lines (and so of progress, :mod:`medssl.progress`) for these flags.

    ``--quiet``: ERROR. ``--verbose``: DEBUG. Neither: INFO when stderr is a terminal, else WARNING, so a
    redirected or captured stderr holds warnings and the one-line errors only.
    """
    from medssl.progress import stderr_is_terminal

    if quiet:
        return logging.ERROR
    if verbose:
        return logging.DEBUG
    return logging.INFO if stderr_is_terminal() else logging.WARNING


@contextlib.contextmanager
def _logging_to_stderr(level: int) -> Iterator[None]:
    """medssl's loggers at ``level``, to the current stderr, for one ``main`` call; restored afterwards."""
    medssl_logger = logging.getLogger("medssl")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    old_level = medssl_logger.level
    medssl_logger.setLevel(level)
    medssl_logger.addHandler(handler)
    try:
        yield
    finally:
        medssl_logger.removeHandler(handler)
        medssl_logger.setLevel(old_level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = log_level(getattr(args, "verbose", False), getattr(args, "quiet", False))
    with _logging_to_stderr(level):
        try:
            return int(args.func(args) or 0)
        except MedsslError as e:
            _print_error(e)  # after every progress line: the errors are the last lines on stderr
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("medssl: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
