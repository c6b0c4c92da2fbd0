"""Command line: ``prefkernels {train,eval,export,score,demo} ...`` (also ``python -m prefkernels``).

Each subcommand is one ``add_<name>_parser(subparsers)`` function that declares its arguments
and sets ``handler`` to a ``run_<name>(args) -> int`` function; ``SUBCOMMANDS`` lists them.
Bad input (data, paths, options, output directories) is reported as one clear line on stderr
and a non-zero exit; set env PREFKERNELS_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; a value default is shown after the option's help."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        default = action.default
        if default is None or isinstance(default, bool) or default is argparse.SUPPRESS or "default" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)"


def _formatter(prog):
    return _Formatter(prog, max_help_position=36)


# ----------------------------------------------------------------------------- train

TRAIN_EXAMPLES = """examples:
  # a reward model on a local backbone, validation every 100 steps, early stopping
  prefkernels train --backbone ./models/minilm --train data/train.jsonl.gz --valid data/valid.jsonl.gz \\
      --output runs/rm --max-length 256 --batch-size 16 --lr 3e-5 --epochs 3 --eval-every 100 --patience 3

  # continue a run that was interrupted (same arguments plus --resume)
  prefkernels train --backbone ./models/minilm --train data/train.jsonl.gz --valid data/valid.jsonl.gz \\
      --output runs/rm --max-length 256 --batch-size 16 --lr 3e-5 --epochs 3 --eval-every 100 --patience 3 --resume

  # 4 GPUs (or CPU processes with gloo), token-budget batches, bf16, tie-aware loss
  torchrun --nproc_per_node=4 -m prefkernels train --backbone ./models/llama --train ties.jsonl \\
      --valid-fraction 0.05 --output runs/ties --max-tokens 16384 --precision bf16 --loss davidson
"""


def add_train_parser(subparsers) -> None:
    from prefkernels.losses import LOSSES
    from prefkernels.trainer import EARLY_STOPPING_METRICS, PRECISIONS, SCHEDULES

    p = subparsers.add_parser("train", help="train a reward model", description="Train a reward model on "
                              "preference pairs (JSONL, TRL formats) and keep the best checkpoint.",
                              epilog=TRAIN_EXAMPLES, formatter_class=_formatter)
    io = p.add_argument_group("data and output")
    io.add_argument("--backbone", required=True, help="local transformers model directory (with tokenizer)")
    io.add_argument("--train", required=True, nargs="+", metavar="FILE", help="training JSONL file(s), .gz allowed")
    io.add_argument("--valid", nargs="+", metavar="FILE", help="validation JSONL file(s)")
    io.add_argument("--valid-fraction", type=float, default=0.0, metavar="F",
                    help="hold out this fraction of --train for validation (instead of --valid)")
    io.add_argument("--output", required=True, metavar="DIR", help="run directory")
    io.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    io.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    io.add_argument("--max-length", type=int, metavar="N",
                    help="tokens per text; longer prompts are cut from the left (default: min(1024, backbone))")
    io.add_argument("--truncate-responses", action="store_true",
                    help="cut responses longer than --max-length from the left instead of failing")
    io.add_argument("--no-margin", dest="use_margin", action="store_false", help="ignore a 'margin' column")

    model = p.add_argument_group("model and loss")
    model.add_argument("--num-heads", type=int, default=1, metavar="K", help="reward heads (K > 1: ensemble)")
    model.add_argument("--loss", choices=LOSSES, default="bt",
                       help="bt (fused Bradley-Terry), davidson / rao-kupper (ties), plackett-luce (rankings)")
    model.add_argument("--label-smoothing", type=float, default=0.0, metavar="E", help="bt label smoothing")
    model.add_argument("--center-coef", type=float, default=0.0, metavar="C",
                       help="reward centering: C * (r_chosen + r_rejected)^2")
    model.add_argument("--tie-strength", type=float, metavar="S",
                       help="Davidson nu (> 0) or Rao-Kupper theta (> 1); default: P(tie)=1/3 at equal rewards")
    model.add_argument("--dropout", action="store_true", help="keep the backbone's dropout (default: off)")
    model.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=1, metavar="N", help="passes over --train")
    opt.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (overrides --epochs)")
    opt.add_argument("--batch-size", type=int, default=8, metavar="PAIRS", help="pairs per batch per process")
    opt.add_argument("--max-tokens", type=int, metavar="T",
                     help="batch by padded tokens (rows x longest row) instead of --batch-size")
    opt.add_argument("--eval-batch-size", type=int, metavar="PAIRS",
                     help="pairs per evaluation batch (default: rows packed by length under the scorer's "
                          "padded-token budget, 4096 on CPU and 32768 on GPU, which pads least)")
    opt.add_argument("--grad-accum", type=int, default=1, metavar="N", help="micro-batches per optimizer step")
    opt.add_argument("--lr", type=float, default=2e-5, help="AdamW peak learning rate")
    opt.add_argument("--head-lr", type=float, metavar="LR", help="learning rate of the reward head (default: --lr)")
    opt.add_argument("--weight-decay", type=float, default=0.01, metavar="W", help="AdamW decay of weight matrices")
    opt.add_argument("--warmup-ratio", type=float, default=0.05, metavar="R", help="share of steps warming up")
    opt.add_argument("--schedule", choices=SCHEDULES, default="linear")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, metavar="G", help="0: no clipping")
    opt.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 autocast on capable GPUs")
    opt.add_argument("--seed", type=int, default=0, help="data order, head init and dropout")

    loop = p.add_argument_group("evaluation, checkpoints, logging")
    loop.add_argument("--eval-every", type=int, default=0, metavar="STEPS", help="0: at the end of each epoch")
    loop.add_argument("--early-stopping-metric", choices=EARLY_STOPPING_METRICS, default="accuracy",
                      help="validation metric that picks the best checkpoint")
    loop.add_argument("--patience", type=int, metavar="EVALS", help="stop after this many evaluations without gain")
    loop.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                      help="checkpoint for --resume every N steps (0: after each evaluation/epoch)")
    loop.add_argument("--log-every", type=int, default=10, metavar="STEPS", help="metrics.jsonl train lines")
    loop.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    loop.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    loop.add_argument("--backend", help="kernel backend: auto, native, triton or reference")
    p.set_defaults(handler=run_train)


def train_config_from_args(args):
    from prefkernels.trainer import TrainConfig

    return TrainConfig(
        backbone=args.backbone, train=args.train, valid=args.valid, valid_fraction=args.valid_fraction,
        output_dir=args.output, overwrite=args.overwrite, resume=args.resume, max_length=args.max_length,
        use_margin=args.use_margin, truncate_responses=args.truncate_responses, num_heads=args.num_heads,
        loss=args.loss, label_smoothing=args.label_smoothing,
        center_coef=args.center_coef, tie_strength=args.tie_strength, dropout=args.dropout,
        gradient_checkpointing=args.gradient_checkpointing, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, max_tokens=args.max_tokens, eval_batch_size=args.eval_batch_size,
        grad_accum=args.grad_accum, lr=args.lr, head_lr=args.head_lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, schedule=args.schedule, max_grad_norm=args.max_grad_norm,
        precision=args.precision, seed=args.seed, eval_every=args.eval_every,
        early_stopping_metric=args.early_stopping_metric, patience=args.patience, save_every=args.save_every,
        log_every=args.log_every, progress=args.progress, device=args.device, backend=args.backend)


def run_train(args) -> int:
    from prefkernels.trainer import train

    result = train(train_config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        chosen = (f"final model (no validation data): {result.best_dir} (step {result.steps})" if result.metrics is None
                  else f"best model: {result.best_dir} (step {result.best_step})")
        print(f"{chosen}; run directory: {result.output_dir}")
    return 0


# ----------------------------------------------------------------------------- eval

EVAL_EXAMPLES = """examples:
  prefkernels eval --model runs/rm/best --data data/valid.jsonl.gz
  prefkernels eval --model runs/rm/best --data test.jsonl --output runs/rm/test-eval --max-length 512
  prefkernels eval --model runs/rm/best --data test.jsonl --json > metrics.json
"""


def add_eval_parser(subparsers) -> None:
    from prefkernels.trainer import PRECISIONS

    p = subparsers.add_parser("eval", help="evaluate a reward model on preference data",
                              description="Score preference data with a checkpoint and report accuracy, loss, "
                              "calibration, length bias, margins, rating agreement and ensemble disagreement.",
                              epilog=EVAL_EXAMPLES, formatter_class=_formatter)
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (e.g. runs/rm/best)")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="JSONL file(s), .gz allowed")
    p.add_argument("--output", metavar="DIR", help="write metrics.json and reliability.png here")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    p.add_argument("--max-length", type=int, metavar="N", help="default: the checkpoint's max_length")
    batching = p.add_mutually_exclusive_group()
    batching.add_argument("--batch-size", type=int, metavar="PAIRS",
                          help="pairs per batch (default: rows packed by length under --max-tokens)")
    batching.add_argument("--max-tokens", type=int, metavar="T",
                          help="padded tokens per batch (default 4096 on CPU, 32768 on GPU)")
    p.add_argument("--truncate-responses", action=argparse.BooleanOptionalAction, default=None,
                   help="cut responses longer than --max-length from the left instead of failing "
                        "(default: as the checkpoint was trained)")
    p.add_argument("--margin", dest="use_margin", action=argparse.BooleanOptionalAction, default=None,
                   help="use a 'margin' column in the loss (default: as the checkpoint was trained)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on capable GPUs")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--backend", help="kernel backend: auto, native, triton or reference")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(handler=run_eval)


def run_eval(args) -> int:
    from prefkernels import backends, checkpoint, metrics
    from prefkernels.data import load_preferences, pad_token_id
    from prefkernels.losses import TIE_LOSSES, LossConfig
    from prefkernels.model import RewardModel, check_max_length, load_tokenizer, resolve_device
    from prefkernels.trainer import autocast_dtype

    config = checkpoint.read_config(args.model)
    max_length = args.max_length if args.max_length is not None else config.get("max_length")
    if max_length is None:
        raise ValueError(f"max_length: {args.model} does not record one; pass --max-length")
    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        raise ValueError(f"output: {args.output} exists and is not a directory")
    backends.requested(args.backend)
    device = resolve_device(args.device)
    model = RewardModel.from_pretrained(args.model)
    check_max_length(max_length, model.backbone.config)
    tokenizer = load_tokenizer(args.model)
    training = config.get("training") or {}
    truncate_responses = args.truncate_responses
    if truncate_responses is None:
        truncate_responses = bool(training.get("truncate_responses", False))
    use_margin = args.use_margin if args.use_margin is not None else bool(training.get("use_margin", True))
    dataset = load_preferences(args.data, tokenizer, max_length, use_margin=use_margin, name="eval",
                               truncate_responses=truncate_responses, progress=args.progress)
    loss = dict(training.get("loss") or {})
    loss_config = LossConfig(**loss) if loss else None  # None: preference_metrics' default for the data
    if dataset.num_ties and loss_config is not None and loss_config.name not in TIE_LOSSES:
        loss_config = None  # trained without a tie model: measure the loss with preference_metrics' default
    model.to(device)
    rewards = metrics.score(model, dataset, batch_size=args.batch_size,
                            max_tokens=args.max_tokens, device=device, pad_token_id=pad_token_id(tokenizer), backend=args.backend,
                            autocast_dtype=autocast_dtype(args.precision, device), progress=args.progress)
    result = metrics.preference_metrics(dataset, rewards, loss_config)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(str(dataset.report))
        print(metrics.format_table(result, title=f"evaluation of {args.model}"))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
        metrics.reliability_diagram(result, out / "reliability.png")
        if not args.json:
            print(f"wrote {out / 'metrics.json'} and {out / 'reliability.png'}")
    return 0


# ----------------------------------------------------------------------------- demo

DEMO_EXAMPLES = """examples:
  prefkernels demo                       # writes runs/demo
  prefkernels demo --output /tmp/demo --overwrite
"""


DEMO_MARKER = ".prefkernels-demo"


def _demo_made(out: Path, backbone_dir: Path) -> bool:
    """Whether ``out``'s data/ and backbone/ are a demo's: its marker file, or (runs of versions before
    the marker) a run.json that trained on ``backbone_dir``."""
    from prefkernels.trainer import RUN_FILE

    if (out / DEMO_MARKER).is_file():
        return True
    try:
        recorded = json.loads((out / RUN_FILE).read_text())["config"]["backbone"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return Path(recorded).resolve() == backbone_dir.resolve()


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="offline end-to-end demo on generated data (about 15 s on 2 CPU cores)",
                              description="Build a tiny random-init Llama-style decoder and a word-level tokenizer "
                              "locally, generate a preference data set with a hidden rule, train a reward model, "
                              "evaluate it on the held-out split, and write metrics and plots. No downloads.",
                              epilog=DEMO_EXAMPLES, formatter_class=_formatter)
    p.add_argument("--output", default="runs/demo", metavar="DIR", help="default: runs/demo")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo run in --output")
    p.add_argument("--train-pairs", type=int, default=2000, help="generated training pairs")
    p.add_argument("--valid-pairs", type=int, default=500, help="generated held-out pairs")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training pairs")
    p.add_argument("--seed", type=int, default=0, help="data, model init and training seed")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads (1 by default: the tiny model gains nothing from more)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(handler=run_demo)


def run_demo(args) -> int:
    import torch

    from prefkernels import tiny
    from prefkernels.data import synthetic
    from prefkernels.trainer import TrainConfig, check_output_dir, holds_run, train

    for name in ("threads", "train_pairs", "valid_pairs"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}: expected >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.output)
    data_dir, backbone_dir = out / "data", out / "backbone"
    config = TrainConfig(
        backbone=str(backbone_dir), train=[str(data_dir / "train.jsonl")], valid=[str(data_dir / "valid.jsonl")],
        output_dir=str(out), overwrite=args.overwrite, max_length=64, batch_size=32, epochs=args.epochs,
        lr=2e-3, warmup_ratio=0.1, eval_every=0, log_every=10, seed=args.seed, progress=args.progress)
    config.validate()
    check_output_dir(config, resumable=False)
    demo_made = _demo_made(out, backbone_dir)
    for found in [*(out / name for name in holds_run(out)), data_dir, backbone_dir]:
        if found.exists() and not demo_made:
            raise ValueError(f"output: {found} exists and is not from a demo run; choose another --output, or "
                             "move it away")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by prefkernels demo: the next demo run here replaces data/ and "
                                   "backbone/\n")
    for stale in (data_dir, backbone_dir):  # the demo's own, from a run replaced or stopped early
        shutil.rmtree(stale, ignore_errors=True)
    synthetic.write_splits(data_dir, args.train_pairs, args.valid_pairs, seed=args.seed)
    tiny.write_tiny_backbone(backbone_dir, hidden_size=64, layers=2, heads=4, seed=args.seed)
    print(f"demo: {args.train_pairs} training and {args.valid_pairs} held-out pairs in {data_dir}; "
          f"random-init tiny Llama backbone in {backbone_dir}")
    result = train(config)
    accuracy = result.metrics["accuracy"]
    print(f"demo: held-out accuracy {accuracy:.4f} after {result.steps} steps in "
          f"{time.perf_counter() - started:.1f} s")
    print(f"demo: outputs in {out} (model {result.best_dir}, metrics {out / 'metrics.jsonl'}, "
          f"{out / 'eval.json'}, plots {out / 'curves.png'} and {out / 'reliability.png'})")
    return 0


# ----------------------------------------------------------------------------- main

def add_export_parser(subparsers) -> None:
    from prefkernels.export import add_export_parser as add

    add(subparsers)


def add_score_parser(subparsers) -> None:
    from prefkernels.score_cli import add_score_parser as add

    add(subparsers)


SUBCOMMANDS = [add_train_parser, add_eval_parser, add_export_parser, add_score_parser, add_demo_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefkernels", formatter_class=_formatter,
        description="Train, evaluate and demo reward (preference) models with fused kernels.",
        epilog="run `prefkernels <command> --help` for a command's options and examples")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    """Entry point of ``prefkernels`` and ``python -m prefkernels``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:  # a Ctrl-C while transformers imports is an interruption too, not a traceback
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # per-file load/save bars would drown the training bar
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"prefkernels {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, FloatingPointError) as err:  # FloatingPointError: a diverged training run
        if os.environ.get("PREFKERNELS_DEBUG") == "1":
            raise
        print(f"prefkernels {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
