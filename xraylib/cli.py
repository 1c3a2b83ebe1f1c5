"""The `xraylib` command: upload, train, evaluate, predict, adapt, explain, compare, run (a notebook),
demo, sagemaker train.

Each subcommand parses its arguments and calls the same public function a notebook calls. A
problem the user can fix (an `XrayError`) prints one line, `xraylib: error: ...`, and exits 2;
anything else is a bug and keeps its traceback. A training stopped by SIGTERM with its checkpoint
saved exits with `config.STOPPED_EXIT_STATUS` (143). Under torchrun (`torchrun ... -m xraylib
train`), every process runs this same command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from xraylib import config
from xraylib.errors import ConfigError, TrainingStopped, XrayError


def cmd_upload(args: argparse.Namespace) -> None:
    from xraylib.storage import upload_directory

    print(upload_directory(args.src, args.dest))


def train_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig values the train flags give (None: not given), as `make_train_config` takes them."""
    return dict(
        preset=args.preset, data=args.data, out=args.out, epochs=args.epochs, image_size=args.image_size,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, weights=args.weights,
        freeze_backbone=args.freeze_backbone or None, augment="none" if args.no_augment else args.augment,
        equalize=args.equalize, threshold_policy=args.threshold_policy, time_budget=args.time_budget,
        label_smoothing=args.label_smoothing, ema_decay=args.ema_decay, val_fraction=args.val_fraction,
        seed=args.seed, device=args.device, precision=args.precision, skip_bad=args.skip_bad or None,
        resume=args.resume or None, keep_epochs=args.keep_epochs or None,
        **{name: getattr(args, name) for name in config.LABEL_OPTIONS},
    )


def cmd_train(args: argparse.Namespace) -> None:
    from xraylib.training import train

    train(config.make_train_config(**train_values(args)), progress=sys.stderr.isatty())


def cmd_sagemaker_train(args: argparse.Namespace) -> None:
    from xraylib.sagemaker import launch_training_job

    launch_training_job(train_values(args), instance_type=args.instance_type, instance_count=args.instance_count,
                        spot=args.spot, max_run=args.max_run, max_wait=args.max_wait, role=args.role,
                        image_uri=args.image_uri, wait=not args.no_wait)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from xraylib.evaluate import evaluate_model
    from xraylib.labels import label_table

    table = label_table(args.labels, **{name: getattr(args, name) for name in config.LABEL_OPTIONS[1:]})
    evaluation = evaluate_model(args.model, args.data, args.out, skip_bad=args.skip_bad, device=args.device,
                                precision=args.precision, tta=args.tta, adapt_batchnorm=args.adapt_batchnorm,
                                progress=sys.stderr.isatty(), labels=table)
    m = evaluation.metrics
    print(f"{m['n_images']} images: accuracy {m['accuracy']:.4f}, sensitivity {m['sensitivity']:.4f}, "
          f"specificity {m['specificity']:.4f}, ROC AUC {m['roc_auc']:.4f}, PR AUC {m['pr_auc']:.4f} "
          f"(threshold {m['threshold']:.3f}, computed in {m['compute_precision']})")
    if evaluation.skipped:
        print(f"skipped {len(evaluation.skipped)} bad image(s)")


def cmd_predict(args: argparse.Namespace) -> None:
    from xraylib.predict import predict_to_csv, stream_predictions

    if args.csv:
        predict_to_csv(args.model, args.images, args.csv, skip_bad=args.skip_bad, precision=args.precision,
                       device=args.device, log=lambda line: print(line, file=sys.stderr))
        return
    # Predictions alone on stdout, one line each, for pipes; notes about skipped files on stderr.
    for prediction in stream_predictions(args.model, args.images, skip_bad=args.skip_bad, precision=args.precision,
                                         device=args.device, log=lambda line: print(line, file=sys.stderr)):
        print(prediction)


def cmd_adapt(args: argparse.Namespace) -> None:
    from xraylib.adaptation import adapt_model_to_images

    adapt_model_to_images(args.model, args.images, args.out, skip_bad=args.skip_bad, precision=args.precision,
                          device=args.device)


def cmd_explain(args: argparse.Namespace) -> None:
    from xraylib.explain import explain_images

    for location in explain_images(args.model, args.images, args.out, device=args.device, skip_bad=args.skip_bad,
                                   log=lambda line: print(line, file=sys.stderr)):
        print(location)


def cmd_compare(args: argparse.Namespace) -> None:
    from xraylib.compare import compare_models, comparison_lines

    if len(args.model) != 2:
        raise ConfigError(f"compare takes two models, --model A --model B; got {len(args.model)}")
    comparison = compare_models(args.model[0], args.model[1], args.data, args.out, device=args.device,
                                precision=args.precision, skip_bad=args.skip_bad, log=lambda line: print(line, file=sys.stderr))
    print("\n".join(comparison_lines(comparison)))


def cmd_run(args: argparse.Namespace) -> None:
    from xraylib.notebooks import parse_parameters, run_notebook

    result = run_notebook(args.notebook, parse_parameters(args.parameter), output=args.output)
    print(f"executed notebook written to {result}")


def cmd_demo(args: argparse.Namespace) -> None:
    from xraylib.demo import run_demo

    run_demo(args.out, images_per_class=args.images_per_class, epochs=args.epochs)


def add_label_flags(p: argparse.ArgumentParser, split: str) -> None:
    """The flags of `config.LABEL_OPTIONS`: labels from a table instead of class folders."""
    layouts = "; ".join(f"{name}: {columns['image_column']!r}, {columns['label_column']!r}, positive {columns['positive']!r}"
                        for name, columns in config.LABEL_LAYOUTS.items())
    p.add_argument("--labels", metavar="LOCATION",
                   help="a CSV (local or s3://) that labels the images below --data, instead of class folders; "
                        f"the columns of a known layout are recognised ({layouts})")
    p.add_argument("--image-column", metavar="NAME", help="the column naming each image: its path below --data, with or "
                                                          "without its extension, or its file name when unique")
    p.add_argument("--label-column", metavar="NAME", help="the column holding each image's label(s)")
    p.add_argument("--positive", metavar="TEXT",
                   help=f"the label of the positive class; a cell that lists it among others ('a{config.LABEL_SEPARATOR}b') "
                        "is positive too")
    p.add_argument("--patient-column", metavar="NAME", help="the column naming each image's patient (the split by patient "
                                                            "keeps them together); default: the file's name or DICOM tag")
    p.add_argument("--split-column", metavar="NAME",
                   help=f"a column saying which split each row is in: {split} reads the rows marked "
                        f"{', '.join(config.LABEL_SPLIT_VALUES[split])}")


SCORING_PRECISION_HELP = ("auto: the precision the model's validation ran in, where its threshold was chosen "
                          "(fp32 for a faster run on a CPU that only emulates bf16; metrics.json records which)")


def add_train_flags(p: argparse.ArgumentParser, *, data_help: str, out_help: str, resume_help: str) -> None:
    """One flag per TrainConfig field, for `train` and `sagemaker train` alike."""
    defaults = config.TrainConfig(data="-", out="-")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--preset", choices=sorted(config.PRESETS), help="a named recipe; explicit flags override it")
    p.add_argument("--epochs", type=int, help=f"default {defaults.epochs}")
    p.add_argument("--image-size", type=int, help=f"pixels per side, default {defaults.image_size}")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="e.g. 30m: time this machine's training speed first, then choose the image size and epochs "
                        "that fill the budget (the cpu preset's way); explicit --image-size or --epochs turn it off")
    p.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    p.add_argument("--lr", type=float, help=f"peak learning rate, default {defaults.lr}")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay, default {defaults.weight_decay}")
    p.add_argument("--weights", help=f"imagenet, none, or a weights file (local or s3://); default {defaults.weights}")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the new head")
    p.add_argument("--label-smoothing", type=float, help=f"default {defaults.label_smoothing}")
    p.add_argument("--ema-decay", type=float,
                   help="validate and keep an exponential moving average of the weights, e.g. 0.995, its decay "
                        f"ramped up from the first step as (1 + n) / (10 + n); default {defaults.ema_decay} (off)")
    p.add_argument("--keep-epochs", action="store_true",
                   help=f"also write every epoch's model, with its own threshold and calibration, to "
                        f"{config.EPOCH_MODEL_FILENAME.format(epoch=1).replace('001', 'NNN')} below --out, to choose an "
                        "epoch later (model.pt stays the one of the best validation ROC AUC)")
    p.add_argument("--augment", choices=config.AUGMENT_LEVELS,
                   help="geometry: rotations, shifts, zoom, contrast; acquisition: also gamma, blur, noise and a dark "
                        f"frame, as other scanners differ; collimation: also one side or more cut and squashed back "
                        f"to the square; default {defaults.augment}")
    p.add_argument("--no-augment", action="store_true", help="the same as --augment none")
    p.add_argument("--equalize", choices=config.EQUALIZE_MODES,
                   help=f"contrast normalization of every image, recorded in the model; default {defaults.equalize}")
    p.add_argument("--threshold-policy", choices=config.THRESHOLD_POLICIES,
                   help=f"how validation picks the decision threshold; default {defaults.threshold_policy}")
    p.add_argument("--val-fraction", type=float, help=f"share of patients held out, default {defaults.val_fraction}")
    p.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=config.PRECISIONS,
                   help="auto: on a CPU that claims native bf16 (AVX-512 BF16 or AMX), bf16 or fp32, whichever a "
                        "few timed steps find faster; bf16 on GPUs from Ampere on, fp16 with loss scaling on older "
                        "GPUs (T4, V100), else fp32")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--skip-bad", action="store_true", help="skip (and report) images that cannot be decoded")
    add_label_flags(p, "train")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xraylib", description="Chest X-ray pneumonia classifier on S3 data.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("upload", help="copy a local dataset folder to a location (skips what is already there)")
    p.add_argument("src", help="local folder, e.g. chest_xray/")
    p.add_argument("dest", help="s3://bucket/prefix or a local folder")
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("train", help="train a ResNet50 on the train/ split of a dataset")
    add_train_flags(p, data_help="dataset root (holding train/) or a folder of class folders",
                    out_help="where model.pt, checkpoint.pt and history go",
                    resume_help="continue the run in --out from its checkpoint: the last finished epoch, or the step where "
                              f"SIGTERM stopped it (exit status {config.STOPPED_EXIT_STATUS})")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics and pictures of a model on the test/ split")
    p.add_argument("--model", required=True, help="a model file, or a train --out location")
    p.add_argument("--data", required=True, help="dataset root (holding test/) or a folder of class folders")
    p.add_argument("--out", required=True, help="where metrics.json, the pictures and predictions.csv go")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--tta", action="store_true", help="average over slightly rotated and zoomed views (5x slower)")
    p.add_argument("--adapt-batchnorm", action="store_true",
                   help="adapt the batch norms' statistics to the images evaluated, without their labels, before scoring "
                        "them (a new scanner or site); each probability then depends on the images scored with it")
    p.add_argument("--skip-bad", action="store_true", help="skip (and report) images that cannot be decoded")
    p.add_argument("--precision", choices=config.PRECISIONS, default="auto",
                   help=SCORING_PRECISION_HELP)
    add_label_flags(p, "test")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify images: one line each, path, label, probability")
    p.add_argument("--model", required=True, help="a model file, or a train --out location")
    p.add_argument("images", nargs="+", help="image files, or folders or s3:// prefixes of them")
    p.add_argument("--skip-bad", action="store_true", help="skip (and report, on stderr) images that cannot be decoded")
    p.add_argument("--precision", choices=config.PRECISIONS, default="auto",
                   help=SCORING_PRECISION_HELP)
    p.add_argument("--csv", metavar="LOCATION",
                   help="write image,label,probability rows to this CSV (local or s3://) as they come, instead of "
                        "standard output; run again, it scores only the images the CSV lacks. Under torchrun every "
                        "process scores its share and the first writes the CSV")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="where to score: cpu (default), or auto / cuda for the GPU (under torchrun, each process's own)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("adapt", help="adapt a model's batch norms to a new site's unlabelled images; write the adapted "
                                     "model file, which predict and evaluate use as any other")
    p.add_argument("--model", required=True, help="a model file, or a train --out location")
    p.add_argument("images", nargs="+", help="the new site's image files, or folders or s3:// prefixes of them (no labels "
                                             f"needed; of more than {config.ADAPT_MAX_IMAGES}, that many drawn at random)")
    p.add_argument("--out", required=True, help="where the adapted model goes: a .pt file, or a folder that gets model.pt "
                                                "(local or s3://); not the model's own location")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--skip-bad", action="store_true", help="skip (and report) images that cannot be decoded")
    p.add_argument("--precision", choices=config.PRECISIONS, default="auto", help=SCORING_PRECISION_HELP)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("explain", help="Grad-CAM heat maps: where the network looks, one overlay PNG per image")
    p.add_argument("--model", required=True, help="a model file, or a train --out location")
    p.add_argument("images", nargs="+", help="image files, or folders or s3:// prefixes of them")
    p.add_argument("--out", required=True, help="where the <image>.gradcam.png overlays go (local or s3://)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--skip-bad", action="store_true", help="skip (and report, on stderr) images that cannot be decoded")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("compare", help="two models on the same test images: each metric's difference with a 95%% interval")
    p.add_argument("--model", required=True, action="append", help="a model file or train --out location; give it twice (A, B)")
    p.add_argument("--data", required=True, help="dataset root (holding test/) or a folder of class folders")
    p.add_argument("--out", help="where comparison.json goes (local or s3://); printed only when not given")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--skip-bad", action="store_true", help="skip (and report) images that cannot be decoded")
    p.add_argument("--precision", choices=config.PRECISIONS, default="auto", help=SCORING_PRECISION_HELP)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("run", help="execute the train or test notebook headless (papermill)")
    p.add_argument("notebook", help="train, test, or a path to a notebook")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    p.add_argument("--output", help="where the executed notebook goes (local or s3://)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the whole workflow offline: local S3 server, generated data, both notebooks")
    p.add_argument("--out", default="demo-output", help="folder for the executed notebooks and results")
    p.add_argument("--images-per-class", type=int, default=None, help="generated images per class and split")
    p.add_argument("--epochs", type=int, default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sagemaker", help="run training as a SageMaker Training Job (pip install 'xraylib[sagemaker]')")
    jobs = p.add_subparsers(dest="sagemaker_command", required=True, metavar="COMMAND")
    p = jobs.add_parser("train", help="`xraylib train` as a training job, under torchrun on every GPU of every instance")
    p.add_argument("--instance-type", required=True, help="e.g. ml.g5.xlarge (one A10G GPU) or ml.g5.12xlarge (four)")
    p.add_argument("--instance-count", type=int, default=config.SAGEMAKER_INSTANCE_COUNT,
                   help=f"instances, one torchrun node each; default {config.SAGEMAKER_INSTANCE_COUNT}")
    p.add_argument("--spot", action="store_true",
                   help="managed spot capacity: cheaper, may be interrupted; the job then resumes from its last checkpoint")
    p.add_argument("--max-run", metavar="DURATION",
                   help=f"the longest the job may train, e.g. 4h; default {config.SAGEMAKER_MAX_RUN}")
    p.add_argument("--max-wait", metavar="DURATION",
                   help=f"with --spot: the longest the job may take, waits for capacity included; default "
                        f"{config.SAGEMAKER_SPOT_WAIT_FACTOR} x --max-run")
    p.add_argument("--role", metavar="ARN",
                   help="the IAM role the job runs as; default: the caller's own (in SageMaker Studio, the notebook's "
                        "execution role)")
    p.add_argument("--image-uri", metavar="URI",
                   help="the training container; default: AWS's prebuilt PyTorch training image for the installed torch")
    p.add_argument("--no-wait", action="store_true", help="print the job's name and return; do not follow its log")
    add_train_flags(p, data_help="s3:// dataset root (holding train/) or a prefix of class folders",
                    out_help="s3:// location for model.pt, history.json and the curves; checkpoints go to <out>/checkpoints",
                    resume_help="changes nothing: a job always resumes from <out>/checkpoints")
    p.set_defaults(func=cmd_sagemaker_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        args.func(args)
    except TrainingStopped as exc:
        print(f"xraylib: {exc}", file=sys.stderr)
        return config.STOPPED_EXIT_STATUS
    except XrayError as exc:
        print(f"xraylib: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xraylib: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
