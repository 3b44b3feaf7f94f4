"""The model commands: ``train``, ``score``, ``evaluate`` and ``report``.
"""

from __future__ import annotations

import argparse
import json
import sys

from cmil_core.commands.shared import (
    Subparsers,
    add_db,
    add_executor,
    audit,
    check_store_path,
    parse_model_id,
    progress,
)
from cmil_core.errors import InputError

__all__ = [
    "add_evaluate",
    "add_report",
    "add_score",
    "add_train",
]


def _folds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value}: cross-validation needs at least 2 folds")
    return value


def _param(text: str) -> tuple[str, int | float]:
    """``NAME=VALUE`` of ``--param``: an aggregator hyper-parameter and its number."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=VALUE (e.g. max_epochs=20)")
    try:
        return name, int(value)
    except ValueError:
        pass
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': {value!r} is not a number") from None


def _cnn_param(text: str) -> tuple[str, object]:
    """NAME=VALUE of a CNN training setting: a number, true/false, or a word (pooling=mean)."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=VALUE (e.g. max_epochs=8)")
    if value.lower() in ("true", "false"):
        return name, value.lower() == "true"
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def _triple(text: str) -> tuple[float, float, float]:
    """Three numbers separated by commas (a per-channel mean or std)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"'{text}' is not three numbers R,G,B (e.g. 0.5,0.5,0.5)")
    return values[0], values[1], values[2]


def _print_encoder_training(db: str, model_id: str, *, quiet: bool) -> None:
    """One line on stderr: whether the patch CNN was trained or frozen, and why (auto rule)."""
    from cmil_core import store

    if quiet:
        return
    with store.using(db, read_only=True) as st:
        row = store.get_model(st, model_id)
    if row is None:
        return
    metrics = row.metrics
    line = f"patch CNN: {metrics.get('encoder_training', 'frozen')}"
    if metrics.get("encoder_training_note"):
        line += f" ({metrics['encoder_training_note']})"
    print(line, file=sys.stderr)


def _cmd_train(args: argparse.Namespace) -> int:
    from cmil_core.model.finetune_config import FinetuneConfig
    from cmil_core.model.mil import make_aggregator
    from cmil_core.model.modeling import train

    params = dict(args.param or [])
    make_aggregator(args.aggregator, **params)  # refuse a bad --param before any work
    cnn_params = dict(args.cnn_param or [])
    cnn = None
    if args.encoder_training != "frozen":  # refuse a bad --cnn-param before any work
        cnn = FinetuneConfig.from_params(cnn_params)
    elif cnn_params:
        raise InputError("--cnn-param applies to --encoder-training finetune or auto only")
    check_store_path(args.db, must_exist=True)
    model_id = train(
        args.db, args.cohort, aggregator=args.aggregator, encoder=args.encoder,
        weights=args.weights, seed=args.seed, folds=args.folds, params=params or None,
        progress=progress(args), encoder_training=args.encoder_training, cnn=cnn,
        input_px=args.input_px, mean=args.mean, std=args.std,
        executor=args.executor, ray_address=args.ray_address,
    )
    _print_encoder_training(args.db, model_id, quiet=args.verbosity < 0)
    audit(args, "train", cohort=args.cohort, model_id=model_id,
           details={"aggregator": args.aggregator, "encoder": args.encoder, "seed": args.seed,
                    "folds": args.folds, "params": params, "via": "cli",
                    "encoder_training": args.encoder_training, "cnn_params": cnn_params})
    print(model_id)  # the contract: the model id is the last line of standard output
    return 0


def add_train(sub: Subparsers) -> None:
    """The ``train`` command's parser; it runs :func:`_cmd_train`."""
    p = sub.add_parser("train", help="train a cMIL model on a training cohort")
    add_db(p, required=True)
    p.add_argument("--cohort", required=True, help="training cohort (its slides ingested)")
    p.add_argument("--aggregator", choices=["histogram", "attention"], default="attention",
                   help="histogram: the study's patch classifier + histogram/TF-IDF + logistic "
                        "regression; attention: gated attention MIL")
    p.add_argument("--encoder", default="smallcnn",
                   choices=["smallcnn", "resnet18", "resnet34", "resnet50", "torchscript",
                            "export"],
                   help="patch encoder (default smallcnn: fast on a CPU)")
    p.add_argument("--weights", metavar="FILE",
                   help="local encoder weights: a torchvision-format state dict (torch or "
                        "safetensors file), a TorchScript file with --encoder torchscript, a "
                        "torch.export .pt2 program with --encoder export; without it a seeded "
                        "initialisation")
    p.add_argument("--encoder-training", choices=["auto", "finetune", "frozen"], default="auto",
                   help="finetune: train the patch CNN on the smears with the patients' labels "
                        "inside each cross-validation fold (the study's method; --weights is "
                        "its starting point); frozen: embed with the encoder as loaded; auto "
                        "(default): finetune, unless the smaller class has under 10 patients "
                        "or 100 quality-passed patches, or the encoder is a whole program "
                        "(then frozen, and train says so)")
    p.add_argument("--cnn-param", type=_cnn_param, action="append", metavar="NAME=VALUE",
                   help="CNN training setting (repeat; finetune only), e.g. --cnn-param "
                        "max_epochs=8 --cnn-param input_px=64: input_px, patches_per_patient, "
                        "patches_per_epoch, max_epochs, patience, lr, pooling (max|mean), "
                        "augment, precision (auto|bf16|fp16|fp32), ... "
                        "(cmil_core.model.finetune_config.FinetuneConfig lists them all)")
    p.add_argument("--input-px", type=int, metavar="PX",
                   help="side the encoder's input is resized to (default 224 frozen, 96 "
                        "finetune); give it with --encoder torchscript/export as the model "
                        "was trained")
    p.add_argument("--mean", type=_triple, metavar="R,G,B",
                   help="per-channel input mean of [0, 1] pixels (default ImageNet's)")
    p.add_argument("--std", type=_triple, metavar="R,G,B",
                   help="per-channel input standard deviation (default ImageNet's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=_folds, default=5,
                   help="cross-validation folds (patient-stratified)")
    p.add_argument("--param", type=_param, action="append", metavar="NAME=VALUE",
                   help="aggregator hyper-parameter (repeat), e.g. --param max_epochs=20 "
                        "--param lr=0.001; histogram: hidden, dropout, lr, max_epochs, n_bins, C, "
                        "...; attention: embed_dim, attention_dim, dropout, lr, max_epochs, ... "
                        "(the model's config.json lists them all)")
    add_executor(p, "computes the feature files")
    p.set_defaults(func=_cmd_train)


def _cmd_score(args: argparse.Namespace) -> int:
    from cmil_core.model.modeling import score

    check_store_path(args.db, must_exist=True)
    done = score(args.db, args.model, args.cohort or None, progress=progress(args),
                 allow_tiling_mismatch=args.allow_tiling_mismatch,
                 executor=args.executor, ray_address=args.ray_address)
    for cohort, n in done.items():
        audit(args, "score", cohort=cohort, model_id=args.model,
               details={"patients": n, "via": "cli"})
    for cohort, n in done.items():
        print(f"{cohort}: {n} patients scored with {args.model}")
    return 0


def add_score(sub: Subparsers) -> None:
    """The ``score`` command's parser; it runs :func:`_cmd_score`."""
    p = sub.add_parser("score", help="score cohorts with a trained model")
    add_db(p, required=True)
    p.add_argument("--model", required=True, type=parse_model_id, metavar="ID",
                   help="model id printed by train")
    p.add_argument("--cohort", action="append", metavar="NAME",
                   help="cohort to score (repeat; default: every cohort)")
    p.add_argument("--allow-tiling-mismatch", action="store_true",
                   help="score cohorts whose patch size, overlap or QC thresholds differ from "
                        "the training cohort's (refused otherwise); their scores are marked")
    add_executor(p, "computes the feature files")
    p.set_defaults(func=_cmd_score)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cmil_core import store
    from cmil_core.model.controls import colour_control, format_control
    from cmil_core.outputs.evaluation import (
        calibration,
        calibration_summary,
        discrimination,
        format_calibration,
        format_evaluation,
        patient_flow,
    )
    from cmil_core.outputs.localisation import localisation
    from cmil_core.store.model_rules import read_model_scores

    check_store_path(args.db, must_exist=True)
    with store.open_store(args.db, read_only=True) as st:
        scores = read_model_scores(st, args.model, in_sample=args.in_sample)
        rows = discrimination(scores)
        loc = localisation(st, args.model) if store.table_counts(st)["demo_tumor_regions"] else None
        flow = patient_flow(st, args.model)
        control = colour_control(st, [r["cohort"] for r in rows])
        calibrated = calibration(scores)
    if args.json:
        print(json.dumps({"cohorts": rows, "localisation": loc, "colour_control": control,
                          "patient_flow": flow.to_dict("records"),
                          "calibration": calibration_summary(calibrated)}, indent=2))
    else:
        print(format_evaluation(rows, loc, flow))
        print(format_calibration(calibrated))
        print(format_control(control, rows))
    return 0


def add_evaluate(sub: Subparsers) -> None:
    """The ``evaluate`` command's parser; it runs :func:`_cmd_evaluate`."""
    p = sub.add_parser("evaluate", help="a model's AUC per cohort (and, on the demo, localisation)")
    add_db(p, required=True)
    p.add_argument("--model", required=True, type=parse_model_id, metavar="ID")
    p.add_argument("--in-sample", action="store_true",
                   help="training row from the final model's in-sample scores (optimistic) "
                        "instead of its out-of-fold scores")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_evaluate)


def _report_cutoff(text: str) -> str | float:
    if text in ("model", "youden", "median", "maxstat"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not model, youden, median, maxstat or a number"
        ) from None


def _cmd_report(args: argparse.Namespace) -> int:
    from cmil_core.outputs.report import write_report

    check_store_path(args.db, must_exist=True)
    path = write_report(args.db, args.model, args.out, endpoint=args.endpoint,
                        cutoff=args.cutoff, progress=progress(args),
                        pseudonymise=args.pseudonymise, in_sample=args.in_sample)
    audit(args, "export", model_id=args.model,
           details={"kind": "report", "out": str(path.parent), "endpoint": args.endpoint,
                    "cutoff": args.cutoff, "pseudonymised": bool(args.pseudonymise),
                    "in_sample": bool(args.in_sample), "via": "cli"})
    print(path)
    return 0


def add_report(sub: Subparsers) -> None:
    """The ``report`` command's parser; it runs :func:`_cmd_report`."""
    p = sub.add_parser("report",
                       help="every table and figure of a model: HTML, JSON, CSV, PNG, SVG")
    add_db(p, required=True)
    p.add_argument("--model", required=True, type=parse_model_id, metavar="ID")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to write (new, empty, or a previous report, which is replaced)")
    p.add_argument("--endpoint", choices=["os", "efs"], default="os",
                   help="survival endpoint: overall or event-free survival")
    p.add_argument("--cutoff", type=_report_cutoff, default="model",
                   metavar="model|youden|median|maxstat|NUMBER",
                   help="risk-group cutoff, fixed on the training cohort (default: the model's)")
    p.add_argument("--in-sample", action="store_true",
                   help="training rows from the final model's in-sample scores (optimistic, "
                        "labelled so) instead of its out-of-fold scores")
    p.add_argument("--pseudonymise", action="store_true",
                   help="replace every patient id by a salted hash (HMAC-SHA256; salt from "
                        "$CMIL_PSEUDONYM_SALT, else a random one not kept)")
    p.set_defaults(func=_cmd_report)
