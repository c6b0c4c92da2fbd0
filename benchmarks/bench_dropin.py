"""Step time (forward + backward + optimizer) of FusedRewardTrainer vs TRL's stock RewardTrainer.

Both trainers get copies of the same randomly initialized Llama classifier and the same batch of
right-padded preference pairs; steps alternate between them (interleaved, order swapped every
step) and the table reports medians. A second table isolates the part the trainers differ in: the
head + loss forward and backward on the same last hidden states (stock: ``score`` over every token,
gather, BT loss; fused: ``fused_bt_loss``). On CUDA, "peak MiB" is the most memory a timed step
allocates above what is held before it (activations, gradients, optimizer temporaries). Writes
benchmarks/results/bench_dropin.json.

    python benchmarks/bench_dropin.py                          # CPU-sized default, < 3 minutes
    python benchmarks/bench_dropin.py --hidden 1024 --layers 8 --seq-len 512 --bf16   # on a GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
import trl
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast
from trl import RewardConfig, RewardTrainer

from machine import RESULTS_DIR, cpu_name
from prefkernels import fused_bt_loss, reference
from prefkernels.integrations import FusedRewardTrainer

RESULTS = RESULTS_DIR / "bench_dropin.json"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256, help="longest sequence; others are 75-100%% of it")
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per batch (2x rows)")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per trainer")
    parser.add_argument("--head-reps", type=int, default=50, help="timed reps of the head+loss-only comparison")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (RewardConfig bf16=True)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args()


def make_tokenizer(vocab_size):
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(vocab_size - 2)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def make_dataset(n_pairs, seq_len, vocab_size, seed=0):
    """Token pairs of random length in [0.75, 1] * seq_len, ending in EOS like TRL's tokenization."""
    g = torch.Generator().manual_seed(seed)

    def sequence():
        length = int(torch.randint(int(0.75 * seq_len), seq_len + 1, (1,), generator=g))
        return torch.randint(2, vocab_size, (length - 1,), generator=g).tolist() + [1]

    return Dataset.from_dict({"chosen_ids": [sequence() for _ in range(n_pairs)],
                              "rejected_ids": [sequence() for _ in range(n_pairs)]})


def make_trainer(trainer_class, model, dataset, tokenizer, args, output_dir):
    config = RewardConfig(output_dir=output_dir, report_to=[], save_strategy="no", seed=0, bf16=args.bf16,
                          per_device_train_batch_size=args.pairs, max_length=None, disable_dropout=True,
                          dataloader_num_workers=0)
    trainer = trainer_class(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # normally set by the training loop
    return trainer


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(trainer, batch, device):
    """Seconds for one training_step (forward + backward) + optimizer step, and the loss."""
    sync(device)
    start = time.perf_counter()
    loss = trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start, float(loss)


def head_and_loss_times(hidden, weight, attention_mask, reps, device):
    """Interleaved median ms of forward + backward of the head + BT loss, stock style vs fused."""
    variants = {"stock head+loss": lambda: reference.hf_style(hidden, weight, attention_mask=attention_mask),
                "fused_bt_loss": lambda: fused_bt_loss(hidden, weight, attention_mask=attention_mask)}
    times = {name: [] for name in variants}
    for rep in range(reps + 3):
        for name, run in (variants.items() if rep % 2 == 0 else reversed(variants.items())):
            hidden.grad = weight.grad = None
            sync(device)
            start = time.perf_counter()
            loss, _ = run()
            loss.backward()
            sync(device)
            if rep >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main():
    args = parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3),
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, num_labels=1, pad_token_id=0, eos_token_id=1)
    model = LlamaForSequenceClassification(config)
    tokenizer = make_tokenizer(args.vocab)
    dataset = make_dataset(args.pairs, args.seq_len, args.vocab)

    output_dir = tempfile.mkdtemp(prefix="bench_dropin_")  # Trainer creates it; nothing is saved
    trainers = {"stock RewardTrainer": make_trainer(RewardTrainer, copy.deepcopy(model), dataset, tokenizer, args,
                                                    output_dir),
                "FusedRewardTrainer": make_trainer(FusedRewardTrainer, model, dataset, tokenizer, args, output_dir)}
    device = next(iter(trainers.values())).args.device
    batch = next(iter(trainers.values())).data_collator([dataset[i] for i in range(args.pairs)])
    times = {name: [] for name in trainers}
    first_loss = {}
    peak_memory = {}
    for step in range(args.warmup + args.steps):
        order = list(trainers) if step % 2 == 0 else list(reversed(trainers))
        for name in order:
            if device.type == "cuda":
                # Both trainers' models and optimizer states stay resident: count what the step adds
                # above them, not the absolute peak (which would include the other trainer's).
                held = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            seconds, loss = timed_step(trainers[name], batch, device)
            first_loss.setdefault(name, loss)
            if device.type == "cuda" and step >= args.warmup:
                peak_memory[name] = max(peak_memory.get(name, 0), torch.cuda.max_memory_allocated() - held)
            if step >= args.warmup:
                times[name].append(seconds)

    rows = {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t),
                   "first_loss": first_loss[name],
                   "peak_memory_mib": peak_memory[name] / 2**20 if name in peak_memory else None}
            for name, t in times.items()}
    stock_ms = rows["stock RewardTrainer"]["median_ms"]
    for row in rows.values():
        row["speedup_vs_stock"] = stock_ms / row["median_ms"]

    classifier = trainers["FusedRewardTrainer"].model
    with torch.no_grad():
        hidden = classifier.model(input_ids=batch["input_ids"].to(device),
                                  attention_mask=batch["attention_mask"].to(device)).last_hidden_state
    head_ms = head_and_loss_times(hidden.detach().requires_grad_(), classifier.score.weight.detach().requires_grad_(),
                                  batch["attention_mask"].to(device), args.head_reps, device)

    tokens = int(batch["attention_mask"].sum())
    print(f"device {device} | Llama vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers | "
          f"{args.pairs} pairs, padded [{2 * args.pairs}, {batch['input_ids'].shape[1]}], {tokens} tokens | "
          f"bf16 {args.bf16} | {args.steps} interleaved steps, medians")
    print(f"{'trainer':<22}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'speedup':>9}{'peak MiB':>10}{'loss@0':>9}")
    for name, row in rows.items():
        memory = f"{row['peak_memory_mib']:.0f}" if row["peak_memory_mib"] is not None else "-"
        print(f"{name:<22}{row['median_ms']:>11.1f}{row['min_ms']:>9.1f}{row['max_ms']:>9.1f}"
              f"{row['speedup_vs_stock']:>8.3f}x{memory:>10}{row['first_loss']:>9.4f}")

    print(f"head + loss only, forward + backward on hidden {list(hidden.shape)} {hidden.dtype}: " + ", ".join(
        f"{name} {ms:.2f} ms" for name, ms in head_ms.items()))

    shutil.rmtree(output_dir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "bench_dropin", "device": str(device),
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
              "threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "trl": trl.__version__},
              "config": {key: value for key, value in vars(args).items() if key != "output"},
              "batch_shape": list(batch["input_ids"].shape), "tokens": tokens, "results": rows,
              "head_and_loss_only_median_ms": head_ms}
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
