"""TRL's RewardTrainer with prefkernels' fused loss: swap the class, keep everything else
(offline, CPU, about a minute).

Trains a small random-init Llama classifier, with a word-level tokenizer built from the training
text, on real human preference pairs: ``../shared/data/hh-harmless`` beside the repository when it
is there (Anthropic's HH-RLHF harmless-base, implicit-prompt ``chosen``/``rejected`` dialogues),
else prefkernels' generated demo pairs (explicit ``prompt``). The only change from a stock TRL
script is the trainer class::

    from prefkernels.integrations import FusedRewardTrainer
    trainer = FusedRewardTrainer(model=model, args=RewardConfig(...), train_dataset=..., ...)

With ``--compare`` the stock ``RewardTrainer`` trains a copy of the same initial model on the same
batches, and the script prints both runs' losses side by side. In fp32 they agree to rounding
at first; over many steps Adam compounds the two heads' rounding differences, so they drift apart
slowly (by a few 1e-3 after 60 steps on the generated pairs).

    python python/trl_drop_in.py                     # hh-harmless when present, else generated pairs
    python python/trl_drop_in.py --synthetic --steps 60 --compare
"""
from __future__ import annotations

import argparse
import collections
import copy
import re
import tempfile
import time
from pathlib import Path

import torch

HH_HARMLESS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-harmless"
WORD = re.compile(r"\w+|[^\w\s]+")  # what the tokenizer's Whitespace pre-tokenizer splits into


def load_pairs(data_dir: Path | None, train_pairs: int, valid_pairs: int) -> tuple[list[dict], list[dict], str]:
    """(train, valid, description): hh-harmless from ``data_dir``, or generated pairs when it is None."""
    if data_dir is None:
        from prefkernels.data import synthetic
        split = synthetic.splits(train_pairs, valid_pairs)
        keep = ("prompt", "chosen", "rejected")
        train, valid = ([{k: r[k] for k in keep} for r in split[name]] for name in ("train", "valid"))
        return train, valid, "prefkernels' generated pairs (explicit prompt)"
    from prefkernels.data import read_records  # names the file and line of a bad record

    train = [record for _, record in read_records(data_dir / "train.jsonl.gz")][:train_pairs]
    valid = [record for _, record in read_records(data_dir / "valid.jsonl.gz")][:valid_pairs]
    return train, valid, f"hh-harmless from {data_dir} (implicit prompt)"


def vocabulary(records: list[dict], size: int) -> list[str]:
    """The ``size`` most frequent words of the records' texts (ties: first seen)."""
    counts = collections.Counter(w for r in records for text in r.values() for w in WORD.findall(text))
    return [w for w, _ in counts.most_common(size)]


def build_model(tokenizer, hidden_size: int, layers: int, seed: int):
    """Random-init ``LlamaForSequenceClassification`` with one output: a reward model."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=tokenizer.model_max_length, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config)


def train(trainer_class, model, tokenizer, train_set, valid_set, args) -> dict:
    """One run: {"losses": the logged training losses (each the mean over its logging window, a tenth
    of the steps), "eval": final eval metrics, "seconds": training wall time, "pairs": training pairs
    left after TRL drops those over max_length}."""
    from trl import RewardConfig

    with tempfile.TemporaryDirectory() as output_dir:
        config = RewardConfig(output_dir=output_dir, report_to=[], save_strategy="no", use_cpu=True, seed=args.seed,
                              max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                              per_device_eval_batch_size=args.batch_size, learning_rate=args.lr,
                              lr_scheduler_type="constant", logging_steps=max(1, args.steps // 10), max_length=args.max_length,
                              bf16=False, dataloader_num_workers=0)
        trainer = trainer_class(model=model, args=config, train_dataset=train_set, eval_dataset=valid_set,
                                processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        metrics = trainer.evaluate()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "eval": metrics, "seconds": seconds, "pairs": len(trainer.train_dataset)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=HH_HARMLESS,
                        help="hh-harmless layout: train.jsonl.gz, valid.jsonl.gz (default: %(default)s)")
    parser.add_argument("--synthetic", action="store_true", help="use prefkernels' generated pairs instead")
    parser.add_argument("--compare", action="store_true", help="also train stock RewardTrainer, same start")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=256, help="TRL drops longer pairs")
    parser.add_argument("--train-pairs", type=int, default=1500)
    parser.add_argument("--valid-pairs", type=int, default=300)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Returns {"data": description, "fused": run, "stock": run (with --compare)}; see ``train``."""
    from datasets import Dataset
    from trl import RewardTrainer

    from prefkernels.integrations import FusedRewardTrainer
    from prefkernels.tiny import build_tiny_tokenizer

    args = parse_args(argv)
    data_dir = None if args.synthetic else args.data_dir
    if data_dir is not None and not (data_dir / "train.jsonl.gz").is_file():
        print(f"{data_dir} has no train.jsonl.gz: using prefkernels' generated pairs")
        data_dir = None
    train_records, valid_records, description = load_pairs(data_dir, args.train_pairs, args.valid_pairs)
    tokenizer = build_tiny_tokenizer(vocabulary(train_records, args.vocab_size), model_max_length=args.max_length)
    model = build_model(tokenizer, args.hidden_size, args.layers, args.seed)
    train_set, valid_set = Dataset.from_list(train_records), Dataset.from_list(valid_records)
    print(f"data: {description}: {len(train_records)} training and {len(valid_records)} held-out pairs; "
          f"model: Llama classifier, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")

    runs = {"fused": (FusedRewardTrainer, model)}
    if args.compare:
        runs["stock"] = (RewardTrainer, copy.deepcopy(model))
    results = {"data": description}
    for name, (trainer_class, run_model) in runs.items():
        results[name] = train(trainer_class, run_model, tokenizer, train_set, valid_set, args)
        run = results[name]
        print(f"{name:>5}: {trainer_class.__name__}, {args.steps} steps over {run['pairs']} pairs in {run['seconds']:.1f} s; "
              f"held out: loss {run['eval']['eval_loss']:.4f}, accuracy {run['eval']['eval_accuracy']:.4f}")
    if args.compare:
        fused, stock = results["fused"]["losses"], results["stock"]["losses"]
        print("logged training loss: fused, stock")
        for fused_loss, stock_loss in zip(fused, stock):
            print(f"  {fused_loss:.6f}  {stock_loss:.6f}")
        print(f"largest difference: {max(abs(a - b) for a, b in zip(fused, stock)):.2e}")
    return results


if __name__ == "__main__":
    main()
