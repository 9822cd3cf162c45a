"""A run's results as people read them: the training-results table of the Zephyr model cards (`results.md`) and a
plot of loss, reward accuracy and margins over steps (`training.png`)."""

from __future__ import annotations

from pathlib import Path

# (column title, training-log key, eval-log key): the zephyr-7b-alpha card's columns, in its order.
DPO_COLUMNS = [
    ("Training Loss", "loss", None),
    ("Epoch", "epoch", None),
    ("Step", "step", None),
    ("Validation Loss", None, "eval_loss"),
    ("Rewards/chosen", None, "eval_rewards/chosen"),
    ("Rewards/rejected", None, "eval_rewards/rejected"),
    ("Rewards/accuracies", None, "eval_rewards/accuracies"),
    ("Rewards/margins", None, "eval_rewards/margins"),
    ("Logps/rejected", None, "eval_logps/rejected"),
    ("Logps/chosen", None, "eval_logps/chosen"),
    ("Logits/rejected", None, "eval_logits/rejected"),
    ("Logits/chosen", None, "eval_logits/chosen"),
]
SFT_COLUMNS = DPO_COLUMNS[:4]
# KTO logs no rewards/accuracies (its rows are unpaired) but logs kl, the reference point of its loss.
KTO_COLUMNS = [
    *SFT_COLUMNS,
    ("Rewards/chosen", None, "eval_rewards/chosen"),
    ("Rewards/rejected", None, "eval_rewards/rejected"),
    ("Rewards/margins", None, "eval_rewards/margins"),
    ("KL", None, "eval_kl"),
    ("Logps/rejected", None, "eval_logps/rejected"),
    ("Logps/chosen", None, "eval_logps/chosen"),
    ("Logits/rejected", None, "eval_logits/rejected"),
    ("Logits/chosen", None, "eval_logits/chosen"),
]
PREFERENCE_STAGES = ("dpo", "cpo", "simpo", "orpo")  # stages that log TRL's rewards/*, logps/* and logits/*


def stage_columns(stage: str) -> list[tuple[str, str | None, str | None]]:
    """The results table's columns for STAGE's metrics."""
    if stage == "kto":
        return KTO_COLUMNS
    return DPO_COLUMNS if stage in PREFERENCE_STAGES else SFT_COLUMNS


def results_rows(log_history: list[dict], stage: str) -> list[list[str]]:
    """One row per evaluation, as the card's table: the latest training loss before it, then the eval metrics.
    Without any evaluation, one row per logged training step (eval columns empty)."""
    columns = stage_columns(stage)
    train = [r for r in log_history if "loss" in r]
    evals = [r for r in log_history if "eval_loss" in r]
    rows = []
    for ev in evals or train:
        before = [r for r in train if r["step"] <= ev["step"]]
        last = before[-1] if before else {}
        cells = []
        for _, train_key, eval_key in columns:
            # step and epoch: the evaluation's own, when it logged them
            if train_key in ("step", "epoch") and train_key in ev:
                value = ev[train_key]
            elif train_key is not None:
                value = last.get(train_key)
            else:
                value = ev.get(eval_key)
            cells.append(_cell(value))
        rows.append(cells)
    return rows


def _cell(value) -> str:
    """A value as the cards print it: floats with more than 4 decimals rounded to 4, shorter ones as they are
    (epoch 0.05 stays "0.05"); a missing value is "No log"."""
    if value is None:
        return "No log"
    text = str(value)
    if isinstance(value, float) and len(text.partition(".")[2]) > 4:
        return f"{value:.4f}"
    return text


def results_table(log_history: list[dict], stage: str) -> str:
    columns = stage_columns(stage)
    head = "| " + " | ".join(c[0] for c in columns) + " |"
    rule = "|" + "|".join(":---:" for _ in columns) + "|"
    body = ["| " + " | ".join(row) + " |" for row in results_rows(log_history, stage)]
    return "\n".join([head, rule, *body])


def plot_training(log_history: list[dict], stage: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in log_history if "loss" in r]
    evals = [r for r in log_history if "eval_loss" in r]
    panels = 2 if stage in (*PREFERENCE_STAGES, "kto") else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_title(f"{stage.upper()} loss")
    if stage in PREFERENCE_STAGES:
        ax2 = axes[0][1]
        for key, label in (("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")):
            ax2.plot([r["step"] for r in train], [r[key] for r in train], label=f"train {label}")
            if evals:
                ax2.plot(
                    [r["step"] for r in evals], [r[f"eval_{key}"] for r in evals], "o-", label=f"eval {label}"
                )
        ax2.set_title(f"{stage.upper()} rewards")
    if stage == "kto":  # rewards of each class, logged only for steps whose batch held that class, and the KL
        ax2 = axes[0][1]
        for key in ("rewards/chosen", "rewards/rejected", "kl"):
            for prefix, rows, style in (("", train, "-"), ("eval_", evals, "o-")):
                logged = [r for r in rows if prefix + key in r]
                if logged:
                    steps, values = [r["step"] for r in logged], [r[prefix + key] for r in logged]
                    ax2.plot(steps, values, style, label=prefix + key)
        ax2.set_title("KTO rewards and KL")
    for a in axes[0]:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(folder: Path, log_history: list[dict], stage: str) -> None:
    (folder / "results.md").write_text(f"## Training results\n\n{results_table(log_history, stage)}\n")
    if any("loss" in r for r in log_history):
        plot_training(log_history, stage, folder / "training.png")
