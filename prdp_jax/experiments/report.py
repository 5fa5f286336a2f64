"""Summaries, verdicts, plots and the results page of the findings.

Every number is a mean over seeds with its standard error over seeds (the evaluation's own
per-prompt error is reported by each run too). A verdict is decided by the explicit rule printed
next to it; nothing is hand-tuned per method.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

from prdp_jax.infra import files

HELDOUT, LARGE, SMALL = "world_heldout", "world_large_sample", "world_small"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0


def summarise(curves: Sequence[dict]) -> dict:
    """Per evaluation set: base, final (mean, se over seeds), gain and final drift; plus the
    mean training-reward curve."""
    out = {"seeds": len(curves), "eval": {}}
    for name in curves[0]["eval"]:
        finals = [c["eval"][name]["reward"][-1] for c in curves]
        gains = [c["eval"][name]["reward"][-1] - c["eval"][name]["reward"][0] for c in curves]
        drifts = [c["eval"][name]["drift"][-1] for c in curves]
        out["eval"][name] = {"base": curves[0]["eval"][name]["reward"][0],
                             "final": mean_se(finals), "gain": mean_se(gains),
                             "drift": mean_se(drifts)}
    return out


def base_spread(curves: Sequence[dict]) -> dict:
    """{set: [lowest, highest]} of the base reward (queries 0) over `curves`, for the sets where
    runs disagree. Every run of a size evaluates the same base on the same seeds, so they agree on
    one machine; a base pretrained on another CPU (a run record made elsewhere) rounds
    differently and can come out a different model (`runner.check_base`)."""
    out = {}
    for name in curves[0]["eval"]:
        bases = [c["eval"][name]["reward"][0] for c in curves]
        if max(bases) != min(bases):
            out[name] = [min(bases), max(bases)]
    return out


def fmt(ms: tuple[float, float], digits: int = 3) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _gain_beyond(s: dict, name: str, k: float = 2.0) -> bool:
    gain, se = s["eval"][name]["gain"]
    return gain > k * max(se, 1e-12)


def _better(a: dict, b: dict, name: str, k: float = 1.0) -> bool:
    """a's final reward exceeds b's by more than k combined standard errors."""
    (ma, sa), (mb, sb) = a["eval"][name]["final"], b["eval"][name]["final"]
    return ma - mb > k * math.hypot(sa, sb)


def verdict(finding: str, summaries: dict) -> tuple[bool, str, str]:
    """(held, what we measured, the rule) for one finding. `summaries[(scale, arm)]`."""
    s = summaries
    if finding == "small_scale":
        p, d = s[("small", "PRDP")], s[("small", "DDPO")]
        (mp, sp), (md, sd) = p["eval"][SMALL]["final"], d["eval"][SMALL]["final"]
        held = mp >= md - math.hypot(sp, sd)
        return held, (f"seen prompts: PRDP {fmt((mp, sp))}, DDPO {fmt((md, sd))} "
                      f"(base {p['eval'][SMALL]['base']:.3f})"), \
            "PRDP's final reward on the training prompts is not below DDPO's by more than 1 SE"
    if finding == "large_scale":
        p = s[("large", "PRDP")]
        dp, db = s[("large", "DDPO (per-prompt norm.)")], s[("large", "DDPO (batch norm.)")]
        held = all(_gain_beyond(p, n) and _better(p, dp, n) for n in (HELDOUT, LARGE))
        text = "; ".join(
            f"{label}: PRDP {fmt(p['eval'][n]['final'])}, DDPO per-prompt "
            f"{fmt(dp['eval'][n]['final'])}, DDPO batch {fmt(db['eval'][n]['final'])} "
            f"(base {p['eval'][n]['base']:.3f})" for label, n in (("held-out", HELDOUT),
                                                                 ("large sample", LARGE)))
        return held, text, ("on held-out and large-sample prompts, PRDP gains > 2 SE over the base "
                            "and ends > 1 SE above DDPO with per-prompt normalisation")
    if finding == "clipping":
        parts, held = [], True
        for scale, n in (("small", SMALL), ("large", HELDOUT)):
            c, u = s[(scale, "PRDP")], s[(scale, "PRDP, no clip")]
            dc, du = s[(scale, "DDPO")], s[(scale, "DDPO, no clip")]
            held &= _better(c, u, n)
            parts.append(f"{scale} ({n}): PRDP {fmt(c['eval'][n]['final'])} vs no clip "
                         f"{fmt(u['eval'][n]['final'])} (drift {fmt(c['eval'][n]['drift'], 2)} vs "
                         f"{fmt(u['eval'][n]['drift'], 2)}); DDPO {fmt(dc['eval'][n]['final'])} vs "
                         f"no clip {fmt(du['eval'][n]['final'])}")
        return held, "; ".join(parts), ("PRDP without its clip ends > 1 SE below PRDP with it "
                                        "at both scales (the clip is needed)")
    if finding == "beta":
        arms = sorted((k for k in s if k[1].startswith("PRDP beta=")),
                      key=lambda k: float(k[1].split("=")[1]))
        rewards = [s[k]["eval"][HELDOUT]["final"][0] for k in arms]
        drifts = [s[k]["eval"][HELDOUT]["drift"][0] for k in arms]
        held = all(np.diff(rewards) <= 0) and all(np.diff(drifts) <= 0)
        text = ", ".join(f"{k[1].split(' ')[1]}: reward {fmt(s[k]['eval'][HELDOUT]['final'])}, "
                         f"drift {fmt(s[k]['eval'][HELDOUT]['drift'], 2)}" for k in arms)
        return held, f"held-out: {text}", ("final held-out reward and drift both fall as beta "
                                           "grows")
    if finding == "online_offline":
        on, off = s[("large", "PRDP online")], s[("large", "PRDP offline")]
        held = _better(on, off, HELDOUT)
        return held, (f"held-out: online {fmt(on['eval'][HELDOUT]['final'])}, offline "
                      f"{fmt(off['eval'][HELDOUT]['final'])} (base "
                      f"{on['eval'][HELDOUT]['base']:.3f})"), \
            "online PRDP ends > 1 SE above offline PRDP on held-out prompts"
    raise KeyError(finding)


def plot(path: str, title: str, curves: dict, sets: Sequence[str]) -> None:
    """Reward against reward queries: one thin line per seed, the mean bold, one panel per
    evaluation set plus the training reward; `curves[label]` is a list of per-seed curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = list(sets) + ["train"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[0], panels):
        for i, (label, runs) in enumerate(curves.items()):
            color = colors[i % len(colors)]
            ys = []
            for c in runs:
                q, y = ((c["queries"], c["train_reward"]) if panel == "train" else
                        (c["eval"][panel]["queries"], c["eval"][panel]["reward"]))
                ax.plot(q, y, color=color, alpha=0.3, linewidth=0.8)
                ys.append(y)
            ax.plot(q, np.mean(ys, axis=0), color=color, linewidth=2, label=label)
        ax.set_title(panel if panel != "train" else "training batches")
        ax.set_xlabel("reward queries")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("alignment reward")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.atomic_write_bytes(path, buf.getvalue())


def plot_beta(path: str, summaries: dict) -> None:
    """Final held-out reward against drift, one point per beta (mean ± SE over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    for (scale, label), s in sorted(summaries.items(), key=lambda kv: kv[0][1]):
        (r, rse), (d, dse) = s["eval"][HELDOUT]["final"], s["eval"][HELDOUT]["drift"]
        ax.errorbar(d, r, xerr=dse, yerr=rse, fmt="o", capsize=3, label=label)
    ax.set_xlabel("drift: mean per-step log-ratio to the base")
    ax.set_ylabel("held-out alignment reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    files.atomic_write_bytes(path, buf.getvalue())


def update_page(path: str, results_dir: str, order: Sequence[str]) -> None:
    """Rewrites the table between the markers of docs/results.md from every finding whose
    `<results_dir>/<finding>.json` exists, in `order` (the prose around the table is kept), so a
    finding run on its own keeps the rows of the others."""
    lines = [BEGIN, "", "| finding | paper | measured here (mean ± SE over seeds) | rule | held? |",
             "|---|---|---|---|---|"]
    for name in order:
        result = os.path.join(results_dir, f"{name}.json")
        if not os.path.exists(result):
            continue
        with open(result) as f:
            r = json.load(f)
        lines.append(f"| {r['finding']} | {r['paper']} | {r['measured']} | {r['rule']} | "
                     f"{'yes' if r['held'] else 'no'} |")
    lines += ["", END]
    table = "\n".join(lines)
    text = open(path).read() if os.path.exists(path) else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    files.atomic_write_bytes(path, (head + table + tail).encode())
