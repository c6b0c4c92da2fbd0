"""Evaluation of a reward model on preference data.

``score`` runs the model over a ``PreferenceDataset`` (length-sorted batches, no grad) and
returns each comparison's rewards [n_responses, K]. ``preference_metrics`` turns those into:
pairwise accuracy, mean loss, calibration of sigmoid(gap) (ECE over 10 bins, Brier score,
reliability bins), length bias (Spearman of reward vs response length, accuracy when the chosen
response is longer/shorter, accuracy by length bucket), reward-gap statistics, agreement with
rating columns (Spearman, Kendall tau-b), and for K > 1 heads the ensemble's disagreement.
Rankings count every ordered pair (better, worse); ties are left out of accuracy and calibration.
``format_table`` prints them; ``reliability_diagram`` and ``plot_training_curves`` write PNGs.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
from pathlib import Path

import numpy as np
import torch

from prefkernels.checks import is_integer, values_checked_by_caller
from prefkernels.data import LengthGroupedBatchSampler, PreferenceDataset, pad_rows, pair_owners, ranking_layout
from prefkernels.losses import LossConfig, check_data, comparison_loss
from prefkernels.model import eval_mode
from prefkernels.scorer import default_token_budget, plan_batches

CALIBRATION_BINS = 10
LENGTH_BUCKETS = 4


# ----------------------------------------------------------------------------- scoring


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def score(model, dataset: PreferenceDataset, *, batch_size: int | None = None, max_tokens: int | None = None,
          indices=None, device=None, autocast_dtype: torch.dtype | None = None, pad_token_id: int = 0,
          backend: str | None = None, progress: bool = False) -> dict[int, np.ndarray]:
    """{example index: rewards [n_responses, K] float32 (best-first order)} for ``indices``
    (default: all) of ``dataset``; ``model`` is a ``RewardModel``, put in eval mode.

    Batches: ``batch_size`` examples grouped by length, or else the rows of all examples packed
    by length under a padded-token budget (``max_tokens``, default the Scorer's for the device),
    which pads least (rows of one example may land in different batches)."""
    examples = [dataset[i] for i in (range(len(dataset)) if indices is None else indices)]
    if not examples:
        return {}
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rows = [(e, r) for e, example in enumerate(examples) for r in range(len(example.input_ids))]
    first_row = np.cumsum([0] + [len(example.input_ids) for example in examples])  # example e's rows start here
    if batch_size is not None and max_tokens is not None:
        raise ValueError("batch_size and max_tokens: pass one of them (pairs per batch, or padded tokens per batch)")
    if batch_size is not None:
        sampler = LengthGroupedBatchSampler([example.row_lengths for example in examples], batch_size=batch_size,
                                            shuffle=False)
        batches = [[j for e in batch for j in range(first_row[e], first_row[e + 1])] for batch in sampler.epoch_batches()]
    else:
        lengths = [len(examples[e].input_ids[r]) for e, r in rows]
        budget = default_token_budget(device) if max_tokens is None else max_tokens
        if not is_integer(budget) or budget < 1:
            raise ValueError(f"max_tokens: expected an integer >= 1, got {budget!r}")
        batches = plan_batches(lengths, budget)
    order = [j for batch in batches for j in batch]  # the rows in the order they are scored
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="scoring", leave=False)
    batch_rewards = []  # on the device, copied back once at the end: no device sync per batch
    autocast = autocast_context(device, autocast_dtype)
    # pad_rows' mask rows all hold a token, so the op's value checks (a device sync) are not needed
    with eval_mode(model), values_checked_by_caller():
        for batch in batches:
            input_ids, attention_mask = pad_rows([examples[rows[j][0]].input_ids[rows[j][1]] for j in batch],
                                                 pad_token_id)
            with autocast:
                batch_rewards.append(model(input_ids.to(device), attention_mask.to(device), backend=backend).float())
    row_rewards = np.full((len(rows), model.num_heads), np.nan, dtype=np.float32)  # a row never scored shows
    row_rewards[order] = torch.cat(batch_rewards).cpu().numpy()
    return {example.index: row_rewards[first_row[e]:first_row[e + 1]] for e, example in enumerate(examples)}


# ----------------------------------------------------------------------------- statistics


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():  # scipy's nan_policy="propagate": a NaN has no rank
        return np.full(len(x), math.nan)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    """x and y as 1-D float64 arrays of one length (ValueError naming the mismatch)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 1 or y.shape != x.shape:
        raise ValueError(f"x, y: expected two 1-D sequences of one length, got shapes {list(x.shape)} and {list(y.shape)}")
    return x, y


def pearson(x, y) -> float:
    x, y = _paired(x, y)
    if len(x) < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else math.nan


def spearman(x, y) -> float:
    """Spearman rank correlation (NaN when either side is constant, holds a NaN, or n < 2)."""
    x, y = _paired(x, y)
    return pearson(rankdata(x), rankdata(y)) if len(x) >= 2 else math.nan


def _dense_ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks with ties sharing one (int64); infinities compare as numbers."""
    return np.unique(x, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _tied_pairs(*keys: np.ndarray) -> int:
    """Pairs equal in every key: sum over groups of equal keys of t(t-1)/2."""
    counts = np.unique(np.stack(keys), axis=1, return_counts=True)[1]
    return int((counts * (counts - 1) // 2).sum())


def _inversions(values: np.ndarray) -> int:
    """Pairs i < j with values[i] > values[j] (int64 ranks in [0, n)), by a bottom-up merge sort
    whose levels are vectorized: O(n log^2 n) in NumPy, no Python loop over elements."""
    n = len(values)
    size = 1 << max(0, (n - 1).bit_length())
    a = np.full(size, n, dtype=np.int64)  # padding after every value, larger than all: no inversion
    a[:n] = values
    inversions, width, stride = 0, 1, n + 1
    while width < size:
        blocks = a.reshape(-1, 2, width)
        offset = np.arange(len(blocks), dtype=np.int64)[:, None] * stride  # keeps each block apart
        left = (blocks[:, 0] + offset).reshape(-1)  # sorted within a block, so sorted overall
        right = blocks[:, 1] + offset
        position = np.searchsorted(left, right.reshape(-1), side="right").reshape(right.shape)
        not_greater = position - offset // stride * width  # left values <= each right value, in its block
        inversions += int((width - not_greater).sum())
        a = np.sort(blocks.reshape(len(blocks), 2 * width), axis=1).reshape(-1)
        width *= 2
    return inversions


def kendall_tau(x, y) -> float:
    """Kendall tau-b (ties corrected) by Knight's algorithm (sort by x, count the inversions of y),
    O(n log^2 n) as vectorized here; NaN when either side is constant or holds a NaN."""
    x, y = _paired(x, y)
    n = len(x)
    if n < 2 or np.isnan(x).any() or np.isnan(y).any():
        return math.nan
    rx, ry = _dense_ranks(x), _dense_ranks(y)
    order = np.lexsort((ry, rx))  # by x, ties in x by y: pairs tied in x are never inversions
    pairs = n * (n - 1) // 2
    tied_x, tied_y, tied_both = _tied_pairs(rx), _tied_pairs(ry), _tied_pairs(rx, ry)
    discordant = _inversions(ry[order])
    concordant_minus_discordant = pairs - tied_x - tied_y + tied_both - 2 * discordant
    denominator = math.sqrt(float(pairs - tied_x) * float(pairs - tied_y))
    return concordant_minus_discordant / denominator if denominator > 0 else math.nan


def calibration(probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Calibration of P(chosen preferred) = sigmoid(gap) for pairs whose chosen side won.

    Each pair is counted in both orientations, (p, outcome 1) and (1 - p, outcome 0), so the
    reliability diagram covers [0, 1] symmetrically. Returns ECE (count-weighted mean
    |accuracy - confidence| over ``bins`` equal-width bins), Brier score mean((1 - p)^2) and the bins.
    """
    p = np.asarray(probabilities, np.float64)
    if len(p) == 0:
        return {"ece": math.nan, "brier": math.nan, "bins": []}
    confidence = np.concatenate([p, 1.0 - p])
    outcome = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    # bin b holds [b/bins, (b+1)/bins), the last also 1.0; a NaN p (a NaN gap) falls in none and
    # makes the ECE NaN, as it does the Brier score
    which = np.searchsorted(np.arange(1, bins) / bins, confidence, side="right")
    known = ~np.isnan(confidence)
    which[~known] = -1
    table, ece = [], 0.0
    for b in range(bins):
        in_bin = which == b
        count = int(in_bin.sum())
        row = {"low": b / bins, "high": (b + 1) / bins, "count": count,
               "confidence": float(confidence[in_bin].mean()) if count else math.nan,
               "accuracy": float(outcome[in_bin].mean()) if count else math.nan}
        if count:
            ece += count / len(confidence) * abs(row["accuracy"] - row["confidence"])
        table.append(row)
    return {"ece": float(ece) if known.all() else math.nan, "brier": float(np.mean((1.0 - p) ** 2)), "bins": table}


def _accuracy(gap: np.ndarray) -> float:
    return float(np.mean((gap > 0) + 0.5 * (gap == 0))) if len(gap) else math.nan


def _quantiles(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {}
    q = np.percentile(values, [0, 5, 25, 50, 75, 95, 100])
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(q[0]), "p05": float(q[1]),
            "p25": float(q[2]), "median": float(q[3]), "p75": float(q[4]), "p95": float(q[5]), "max": float(q[6])}


# ----------------------------------------------------------------------------- metrics


def _reward_rows(dataset: PreferenceDataset, rewards: dict) -> dict[int, np.ndarray]:
    """``rewards`` as float32 arrays [rows, K], each checked against its example (one row per
    response) and all with one K; arrays, lists or tensors (detached) in."""
    out, heads = {}, None
    for index, value in rewards.items():
        if not isinstance(index, numbers.Integral) or not 0 <= index < len(dataset):
            raise ValueError(f"rewards: key {index!r} is not an example index of the dataset [0, {len(dataset)})")
        if isinstance(value, torch.Tensor):
            value = value.detach().float().cpu()  # float(): NumPy has no bfloat16
        value = np.asarray(value, dtype=np.float32)
        rows = len(dataset[index].input_ids)
        if value.ndim != 2 or value.shape[0] != rows or (heads is not None and value.shape[1] != heads):
            raise ValueError(f"rewards[{index}]: expected shape [{rows}, {heads or 'K'}] (one row per response "
                             f"of example {index}, one column per head), got {list(value.shape)}")
        heads = value.shape[1]
        out[int(index)] = value
    return out


def _flatten(dataset: PreferenceDataset, rewards: dict[int, np.ndarray]) -> dict:
    """Responses and ordered pairs of the scored examples as flat arrays."""
    indices = sorted(rewards)
    examples = [dataset[i] for i in indices]
    counts = [len(e.input_ids) for e in examples]
    ranking, chosen, rejected = ranking_layout(counts)
    pair_of = pair_owners(counts).numpy()
    return {
        "rewards": np.concatenate([rewards[i] for i in indices]).astype(np.float32),
        "lengths": np.array([n for e in examples for n in e.response_lengths], dtype=np.float64),
        "row_lengths": np.array([n for e in examples for n in e.row_lengths], dtype=np.float64),
        "ratings": np.array([r for e in examples for r in e.ratings], dtype=np.float64),
        "ranking": ranking, "chosen": chosen, "rejected": rejected,
        "tie": np.array([examples[g].tie for g in pair_of], dtype=bool),
        "margin": (np.array([examples[g].margin for g in pair_of], dtype=np.float64)
                   if examples and examples[0].margin is not None else None),
        "truncated": sum(e.truncated for e in examples),
    }


def preference_metrics(dataset: PreferenceDataset, rewards: dict[int, np.ndarray],
                       loss_config: LossConfig | None = None, bins: int = CALIBRATION_BINS) -> dict:
    """All evaluation metrics (a JSON-able dict) of ``rewards`` from ``score`` on ``dataset``.

    Gaps use the ensemble mean over the K heads. ``loss`` is ``loss_config``'s loss averaged over
    comparisons and heads (default: Bradley-Terry, Davidson when the data has ties; a loss without
    a tie model is refused for data with ties, as in training).
    """
    if not rewards:
        raise ValueError("rewards: nothing was scored")
    rewards = _reward_rows(dataset, rewards)
    flat = _flatten(dataset, rewards)
    per_head = flat["rewards"]  # [R, K]
    mean_reward = per_head.mean(axis=1)
    chosen, rejected, tie = flat["chosen"].numpy(), flat["rejected"].numpy(), flat["tie"]
    gap_heads = per_head[chosen] - per_head[rejected]  # [P, K]
    gap = mean_reward[chosen] - mean_reward[rejected]
    decided = ~tie
    d = gap[decided]

    loss_config = loss_config or LossConfig("davidson" if tie.any() else "bt")
    check_data(loss_config, int(tie.sum()), False, "dataset")
    margin = flat["margin"]
    with torch.no_grad():
        loss = comparison_loss(torch.from_numpy(per_head), loss_config, ranking=flat["ranking"],
                               chosen_index=flat["chosen"], rejected_index=flat["rejected"],
                               margin=None if margin is None else torch.from_numpy(margin).float(),
                               tie=torch.from_numpy(tie) if tie.any() else None)
    metrics = {
        "comparisons": len(rewards), "pairs": int(decided.sum()), "ties": int(tie.sum()),
        "responses": len(mean_reward), "heads": per_head.shape[1], "truncated": flat["truncated"],
        "accuracy": _accuracy(d), "loss": float(loss.mean()), "loss_name": loss_config.name,
    }
    probabilities = torch.sigmoid(torch.from_numpy(d.astype(np.float64))).numpy()  # no overflow for huge gaps
    cal = calibration(probabilities, bins)
    metrics.update(ece=cal["ece"], brier=cal["brier"])
    metrics["reward_gap"] = _quantiles(d)
    metrics["reward_mean"] = per_head.mean(axis=0).astype(float).tolist()
    metrics["reward_std"] = per_head.std(axis=0).astype(float).tolist()

    lengths = flat["lengths"]
    longer = (lengths[chosen] > lengths[rejected])[decided]
    shorter = (lengths[chosen] < lengths[rejected])[decided]
    metrics["length"] = {
        "spearman_reward_vs_length": spearman(mean_reward, lengths),
        "chosen_longer_share": float(longer.mean()) if len(d) else math.nan,
        "accuracy_chosen_longer": _accuracy(d[longer]), "accuracy_chosen_shorter": _accuracy(d[shorter]),
        "buckets": _length_buckets(np.maximum(flat["row_lengths"][chosen], flat["row_lengths"][rejected])[decided], d),
    }
    if margin is not None:
        metrics["margin_spearman"] = spearman(margin[decided], d)
    rated = np.isfinite(flat["ratings"])
    if rated.any():
        x, y = mean_reward[rated], flat["ratings"][rated]
        metrics["ratings"] = {"responses": int(rated.sum()), "spearman": spearman(x, y), "kendall": kendall_tau(x, y)}
    if tie.any():
        metrics["tie_mean_abs_gap"] = float(np.abs(gap[tie]).mean())
        metrics["decided_mean_abs_gap"] = float(np.abs(d).mean()) if len(d) else math.nan
    if per_head.shape[1] > 1:
        signs = np.sign(gap_heads[decided])
        metrics["ensemble"] = {
            "accuracy_per_head": [_accuracy(gap_heads[decided][:, k]) for k in range(per_head.shape[1])],
            "reward_std_mean": float(per_head.std(axis=1).mean()),
            "gap_std_mean": float(gap_heads[decided].std(axis=1).mean()) if len(d) else math.nan,
            # agreed: every head's gap of one strict sign (a NaN gap has none)
            "disagreement": float((np.abs(signs.sum(axis=1)) != signs.shape[1]).mean()) if len(d) else math.nan,
        }
    metrics["calibration_bins"] = cal["bins"]
    return json_safe(metrics)


def _length_buckets(pair_length: np.ndarray, gap: np.ndarray) -> list[dict]:
    if len(gap) == 0:
        return []
    edges = np.unique(np.percentile(pair_length, np.linspace(0, 100, LENGTH_BUCKETS + 1)))
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]])
    which = np.clip(np.searchsorted(edges, pair_length, side="right") - 1, 0, len(edges) - 2)
    return [{"min_tokens": int(pair_length[which == b].min()), "max_tokens": int(pair_length[which == b].max()),
             "pairs": int((which == b).sum()), "accuracy": _accuracy(gap[which == b])}
            for b in range(len(edges) - 1) if (which == b).any()]


def json_safe(value):
    """NaN/inf -> None, numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def scalar_metrics(metrics: dict) -> dict:
    """The flat scalar subset (for metrics.jsonl lines and progress bars)."""
    keys = ("accuracy", "loss", "ece", "brier")
    out = {k: metrics[k] for k in keys if k in metrics}
    out["length_spearman"] = metrics["length"]["spearman_reward_vs_length"]
    if "ratings" in metrics:
        out["rating_spearman"] = metrics["ratings"]["spearman"]
    if "ensemble" in metrics:
        out["ensemble_disagreement"] = metrics["ensemble"]["disagreement"]
    return out


# ----------------------------------------------------------------------------- output


def format_value(value, digits: int = 4) -> str:
    """A metric as printed: floats with ``digits`` decimals, "n/a" for None (an undefined metric)."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(metrics: dict, title: str = "evaluation") -> str:
    """A plain-text table of ``preference_metrics`` output."""
    gap = metrics.get("reward_gap") or {}
    length = metrics["length"]
    rows = [
        ("comparisons / pairs / ties", f"{metrics['comparisons']} / {metrics['pairs']} / {metrics['ties']}"),
        ("truncated comparisons", metrics["truncated"]),
        ("accuracy", format_value(metrics["accuracy"])),
        (f"loss ({metrics['loss_name']})", format_value(metrics["loss"])),
        ("ECE (10 bins)", format_value(metrics["ece"])),
        ("Brier score", format_value(metrics["brier"])),
        ("reward gap mean / std", f"{format_value(gap.get('mean'), 3)} / {format_value(gap.get('std'), 3)}"),
        ("reward gap p05 / median / p95",
         f"{format_value(gap.get('p05'), 3)} / {format_value(gap.get('median'), 3)} / {format_value(gap.get('p95'), 3)}"),
        ("length bias (Spearman reward~length)", format_value(length["spearman_reward_vs_length"])),
        ("accuracy, chosen longer / shorter",
         f"{format_value(length['accuracy_chosen_longer'])} / {format_value(length['accuracy_chosen_shorter'])}"),
    ]
    for bucket in length["buckets"]:
        rows.append((f"  accuracy, {bucket['min_tokens']}-{bucket['max_tokens']} tokens",
                     f"{format_value(bucket['accuracy'])} ({bucket['pairs']} pairs)"))
    if "margin_spearman" in metrics:
        rows.append(("Spearman(margin, gap)", format_value(metrics["margin_spearman"])))
    if "ratings" in metrics:
        r = metrics["ratings"]
        rows.append((f"ratings Spearman / Kendall ({r['responses']})", f"{format_value(r['spearman'])} / {format_value(r['kendall'])}"))
    if "tie_mean_abs_gap" in metrics:
        rows.append(("mean |gap| ties / decided",
                     f"{format_value(metrics['tie_mean_abs_gap'], 3)} / {format_value(metrics['decided_mean_abs_gap'], 3)}"))
    if "ensemble" in metrics:
        e = metrics["ensemble"]
        rows.append((f"ensemble ({metrics['heads']} heads) disagreement", format_value(e["disagreement"])))
        rows.append(("ensemble reward std (mean)", format_value(e["reward_std_mean"])))
        rows.append(("accuracy per head", " ".join(format_value(a, 3) for a in e["accuracy_per_head"])))
    width = max(len(name) for name, _ in rows)
    lines = [title, "-" * (width + 20)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def reliability_diagram(metrics: dict, path) -> Path:
    """PNG of the calibration bins (accuracy vs confidence, counts below)."""
    bins = metrics["calibration_bins"]
    figure = _figure(5, 5.5)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    width = bins[0]["high"] - bins[0]["low"] if bins else 0.1
    top.bar(centers, [b["accuracy"] or 0.0 for b in bins], width=width * 0.9, edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylabel("empirical P(preferred)")
    top.set_title(f"reliability of sigmoid(reward gap)  ECE={format_value(metrics['ece'], 3)}")
    top.legend(loc="upper left")
    bottom.bar(centers, [b["count"] for b in bins], width=width * 0.9, color="gray")
    bottom.set_xlabel("predicted P(preferred)")
    bottom.set_ylabel("count")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def read_metrics_log(path) -> list[dict]:
    """Events of a metrics.jsonl file (complete lines only)."""
    events = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):
                events.append(json.loads(line))
    return events


def plot_training_curves(metrics_log, path) -> Path:
    """PNG of training and validation loss/accuracy against optimizer steps from metrics.jsonl."""
    events = read_metrics_log(metrics_log)
    figure = _figure(10, 4)
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    for kind, style in (("train", "-"), ("eval", "o-")):
        points = [e for e in events if e.get("event") == kind]
        steps = [e["step"] for e in points]
        label = "train" if kind == "train" else "validation"
        loss_axis.plot(steps, [e.get("loss") for e in points], style, label=label)
        accuracy_axis.plot(steps, [e.get("accuracy") for e in points], style, label=label)
    for axis, name in ((loss_axis, "loss"), (accuracy_axis, "pairwise accuracy")):
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)
