"""A readable summary of a partition: a Markdown table and a PNG of hours, subset mix and sex mix per client."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedhubert.plots import MANY_CLIENTS, plt, save_figure


def summary_table(partition: dict) -> str:
    lines = [
        f"# Partition: {partition['scheme']} (seed {partition['seed']}), {partition['num_clients']} clients",
        "",
        f"Corpus: `{partition['corpus']}`. Skew: hours CV {partition['skew']['hours_cv']}, "
        f"sex TV {partition['skew']['sex_tv']}, subset TV {partition['skew']['subset_tv']} (0 = identical mixes).",
        "",
        "| client | speakers | valid split | train utts | valid utts | train h | valid h | female | subsets |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in partition["clients"]:
        subsets = ", ".join(f"{k} {v:.0%}" for k, v in c["subset_mix"].items())
        lines.append(
            f"| {c['client']} | {len(c['speakers'])} | {c['valid_split']} | {c['utterances']['train']} | "
            f"{c['utterances']['valid']} | {c['hours']['train']:.3f} | {c['hours']['valid']:.3f} | "
            f"{c['sex_mix'].get('F', 0.0):.0%} | {subsets} |"
        )
    if partition["heldout"]:
        lines += ["", "| held-out set | speakers | utterances | hours |", "|---|---|---|---|"]
        for name, h in partition["heldout"].items():
            lines.append(f"| {name} | {h['speakers']} | {h['utterances']} | {h['hours']:.3f} |")
    rejected = partition["rejected"]
    lines += ["", f"Rejected files: {rejected['count']}" + (" (see rejected.tsv)" if rejected["count"] else "")]
    for reason, count in rejected["by_reason"].items():
        lines.append(f"- {count} x {reason}")
    if partition["unassigned_speakers"]:
        lines.append(f"Speakers left out by sampling: {len(partition['unassigned_speakers'])}")
    return "\n".join(lines) + "\n"


def plot_clients(partition: dict, path: Path) -> None:
    """Audio (by subset) and sex mix per client: a bar each, or above MANY_CLIENTS the clients ranked by audio
    (subsets stacked) and a histogram of their female share."""
    clients = partition["clients"]
    if len(clients) > MANY_CLIENTS:
        save_figure(_many_clients_figure(partition), path)
        return
    labels = [str(c["client"]) for c in clients]
    subsets = sorted({s for c in clients for s in c["subset_mix"]})
    hours = [c["hours"]["train"] + c["hours"]["valid"] for c in clients]
    fig, (ax_hours, ax_sex) = plt.subplots(1, 2, figsize=(max(8, 0.5 * len(clients) + 6), 4))
    bottom = [0.0] * len(clients)
    for subset in subsets:
        part = [h * c["subset_mix"].get(subset, 0.0) for h, c in zip(hours, clients, strict=True)]
        ax_hours.bar(labels, part, bottom=bottom, label=subset)
        bottom = [b + p for b, p in zip(bottom, part, strict=True)]
    ax_hours.set(xlabel="client", ylabel="hours", title=f"audio per client ({partition['scheme']})")
    ax_hours.legend(fontsize="small")
    female = [c["sex_mix"].get("F", 0.0) for c in clients]
    ax_sex.bar(labels, female, label="female", color="tab:red")
    ax_sex.bar(labels, [1 - f for f in female], bottom=female, label="male", color="tab:blue")
    ax_sex.set(xlabel="client", ylabel="share of audio", ylim=(0, 1), title="sex mix per client")
    ax_sex.legend(fontsize="small")
    save_figure(fig, path)


def _many_clients_figure(partition: dict):
    clients = sorted(partition["clients"], key=lambda c: -(c["hours"]["train"] + c["hours"]["valid"]))
    subsets = sorted({s for c in clients for s in c["subset_mix"]})
    hours = np.array([c["hours"]["train"] + c["hours"]["valid"] for c in clients])
    rank = np.arange(1, len(clients) + 1)
    fig, (ax_hours, ax_sex) = plt.subplots(1, 2, figsize=(11, 4))
    parts = [hours * np.array([c["subset_mix"].get(s, 0.0) for c in clients]) for s in subsets]
    ax_hours.stackplot(rank, *parts, labels=subsets, step="post")
    ax_hours.set(
        xlabel="client rank (most audio first)",
        ylabel="hours",
        title=f"audio per client ({partition['scheme']}, {len(clients)} clients; median {np.median(hours):.3g} h)",
    )
    ax_hours.legend(fontsize="small")
    female = [c["sex_mix"].get("F", 0.0) for c in clients]
    ax_sex.hist(female, bins=np.linspace(0, 1, 21), color="tab:red", edgecolor="white")
    ax_sex.set(xlabel="female share of a client's audio", ylabel="clients", title="sex mix across clients")
    return fig
