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
    """Per evaluation set: base, final, gain and final drift (each mean, se over seeds), the
    evaluation's own paired standard error of a run's gain (median over seeds), and the gains of
    the reward's components; plus the clip fraction of each pass (mean over epochs and seeds)."""
    out = {"seeds": len(curves), "eval": {}}
    for name in curves[0]["eval"]:
        e = [c["eval"][name] for c in curves]
        comps = {k: mean_se([x["components"][k][-1] - x["components"][k][0] for x in e])
                 for k in e[0].get("components", {})}
        ses = [x["gain_se"] for x in e if x.get("gain_se") is not None]
        out["eval"][name] = {"base": e[0]["reward"][0],
                             "final": mean_se([x["reward"][-1] for x in e]),
                             "gain": mean_se([x["reward"][-1] - x["reward"][0] for x in e]),
                             "drift": mean_se([x["drift"][-1] for x in e]),
                             "eval_gain_se": float(np.median(ses)) if ses else None,
                             "components_gain": comps}
    if "clip_frac_by_pass" in curves[0]:
        out["clip_frac_by_pass"] = np.mean([c["clip_frac_by_pass"] for c in curves],
                                           axis=(0, 1)).tolist()
    out["clip_frac"] = float(np.mean([c["clip_frac"] for c in curves]))
    return out


def base_spread(curves: Sequence[dict]) -> dict:
    """{set: [lowest, highest]} of the base reward (queries 0) over `curves`, for the sets where
    runs disagree. Every run evaluates the same shipped base on the same seeds, so they agree on
    one machine; a CPU with other vector instructions rounds the evaluation differently
    (`runner.check_base`)."""
    out = {}
    for name in curves[0]["eval"]:
        bases = [c["eval"][name]["reward"][0] for c in curves]
        if max(bases) != min(bases):
            out[name] = [min(bases), max(bases)]
    return out


def hosts_text(hosts: dict) -> str:
    """'15 runs on <host>; 3 on <host>' from {host: run count}, most runs first."""
    items = sorted(hosts.items(), key=lambda kv: -kv[1])
    return "; ".join(f"{n} run{'s' if n > 1 else ''} on {h}" if i == 0 else f"{n} on {h}"
                     for i, (h, n) in enumerate(items))


def fmt(ms: tuple[float, float], digits: int = 4, sign: bool = False) -> str:
    return f"{ms[0]:{'+' if sign else ''}.{digits}f} ± {ms[1]:.{digits}f}"


def fmt_drift(ms: tuple[float, float]) -> str:
    """Drift spans decades across arms (1e-5 to 1e-3): two significant digits, not decimals."""
    return f"{ms[0]:.1e} ± {ms[1]:.1e}"


def _gain_beyond(s: dict, name: str, k: float = 2.0) -> bool:
    gain, se = s["eval"][name]["gain"]
    return gain > k * max(se, 1e-12)


def _better(a: dict, b: dict, name: str, k: float = 1.0) -> bool:
    """a's final reward exceeds b's by more than k combined standard errors (over seeds)."""
    (ma, sa), (mb, sb) = a["eval"][name]["final"], b["eval"][name]["final"]
    return ma - mb > k * math.hypot(sa, sb)


# ---- The rules, fixed before any run of the new world (issue 27) ----
#
# Evaluation sets and their size (runner.SIZES): every run is evaluated at its end on
# world_small, world_large_sample and world_heldout with fixed seeds, the base once per scale
# (shared): at the large scales the first 256 captions of each (all 32 of world_small) x 4
# samples; at small scale, whose verdicts read world_small, the first 32 x 32. A finding's
# verdict is only decided where the evaluation can see its effect: on each set a verdict reads,
# the evaluation's paired standard error of one run's gain (median over the runs) must be at
# most a third of the effect judged, the reference arm's mean gain there (`POWER`); otherwise
# the verdict is "undecided: evaluation too small", with the numbers. A mean below is over 3
# seeds, ± its standard error over seeds.
POWER = 1 / 3

RULES = {
    "small_scale": "on world_small (the training captions), PRDP gains > 2 SE over the base and "
                   "its final reward is not below DDPO's by more than 1 combined SE",
    "large_scale": "on world_large_sample and world_heldout, PRDP gains > 2 SE over the base and "
                   "ends > 1 combined SE above DDPO with per-prompt normalisation",
    "clipping": "at both scales in the K = 10 regime (small: world_small; large: "
                "world_large_sample), the clip binds (PRDP's clip fraction from the second pass "
                "on > 5%) and PRDP without its clip ends > 1 combined SE below PRDP with it",
    "beta": "trained on quality alone, judged on world_large_sample: at the smallest beta the "
            "gold reward (alignment) falls > 2 SE below the base (reward hacking), and at some "
            "larger beta quality rises > 2 SE while alignment does not fall by more than 1 SE",
    "online_offline": "on world_large_sample, online PRDP ends > 1 combined SE above offline "
                      "PRDP (equal reward queries and gradient updates)",
}
# The set whose evaluation must have the power to judge each finding, and whose effect sets it.
JUDGED = {"small_scale": [("small", "PRDP", SMALL)],
          "large_scale": [("large", "PRDP", LARGE), ("large", "PRDP", HELDOUT)],
          "clipping": [("small", "PRDP", SMALL), ("large_k", "PRDP", LARGE)],
          "beta": [("large", None, LARGE)],
          "online_offline": [("large", "PRDP online", LARGE)]}


def power(finding: str, summaries: dict) -> tuple[bool, str]:
    """(enough, text): whether each judged set's evaluation SE is <= POWER x the effect."""
    ok, parts = True, []
    for scale, arm, name in JUDGED[finding]:
        if arm is None:   # beta: the largest quality gain among the arms, on quality
            s = [v for (sc, _), v in summaries.items() if sc == scale]
            effect = max(abs(v["eval"][name]["components_gain"]["quality"][0]) for v in s)
        else:
            s = [summaries[(scale, arm)]]
            effect = abs(s[0]["eval"][name]["gain"][0])
        se = max((v["eval"][name]["eval_gain_se"] or 0.0) for v in s)
        ok &= se <= POWER * effect
        parts.append(f"{scale}/{name}: evaluation SE {se:.4f} vs effect {effect:.4f}")
    return ok, "; ".join(parts)


def verdict(finding: str, summaries: dict) -> tuple[bool, str, str]:
    """(held, what we measured, the rule) for one finding. `summaries[(scale, arm)]`."""
    s, rule = summaries, RULES[finding]
    if finding == "small_scale":
        p, d = s[("small", "PRDP")], s[("small", "DDPO")]
        (mp, sp), (md, sd) = p["eval"][SMALL]["final"], d["eval"][SMALL]["final"]
        held = _gain_beyond(p, SMALL) and mp >= md - math.hypot(sp, sd)
        gp, gd = (fmt(x["eval"][SMALL]["gain"], sign=True) for x in (p, d))
        text = (f"world_small: PRDP {fmt((mp, sp))} (gain {gp}), DDPO {fmt((md, sd))} (gain {gd}); "
                f"base {p['eval'][SMALL]['base']:.3f}; PRDP's clip fraction by pass "
                + _passes(p))
    elif finding == "large_scale":
        p = s[("large", "PRDP")]
        dp, db = s[("large", "DDPO (per-prompt norm.)")], s[("large", "DDPO (batch norm.)")]
        held = all(_gain_beyond(p, n) and _better(p, dp, n) for n in (HELDOUT, LARGE))
        text = "; ".join(
            f"{n}: gain PRDP {fmt(p['eval'][n]['gain'], sign=True)}, DDPO per-prompt "
            f"{fmt(dp['eval'][n]['gain'], sign=True)}, DDPO batch "
            f"{fmt(db['eval'][n]['gain'], sign=True)} (base {p['eval'][n]['base']:.3f})"
            for n in (LARGE, HELDOUT))
    elif finding == "clipping":
        parts, held = [], True
        for scale, n in (("small", SMALL), ("large_k", LARGE)):
            c, u = s[(scale, "PRDP")], s[(scale, "PRDP, no clip")]
            dc, du = s[(scale, "DDPO")], s[(scale, "DDPO, no clip")]
            binds = np.mean(c.get("clip_frac_by_pass", [0.0])[1:]) > 0.05
            held &= bool(binds) and _better(c, u, n)
            dr = [fmt_drift(x["eval"][n]["drift"]) for x in (c, u)]
            parts.append(f"{scale} ({n}): gain PRDP {fmt(c['eval'][n]['gain'], sign=True)} vs no "
                         f"clip {fmt(u['eval'][n]['gain'], sign=True)} (drift {dr[0]} vs {dr[1]}; "
                         f"clip fraction by pass {_passes(c)}); DDPO "
                         f"{fmt(dc['eval'][n]['gain'], sign=True)} vs no clip "
                         f"{fmt(du['eval'][n]['gain'], sign=True)}")
        text = "; ".join(parts)
    elif finding == "beta":
        arms = sorted((k for k in s if k[1].startswith("PRDP beta=")),
                      key=lambda k: float(k[1].split("=")[1]))
        comp = lambda k, c: s[k]["eval"][LARGE]["components_gain"][c]
        low = comp(arms[0], "alignment")
        hacks = low[0] < -2 * max(low[1], 1e-12)
        keeps = any(comp(k, "quality")[0] > 2 * max(comp(k, "quality")[1], 1e-12)
                    and comp(k, "alignment")[0] >= -max(comp(k, "alignment")[1], 1e-12)
                    for k in arms[1:])
        held = hacks and keeps
        text = "world_large_sample, gains: " + ", ".join(
            f"{k[1].split(' ')[1]}: quality {fmt(comp(k, 'quality'), sign=True)}, alignment "
            f"{fmt(comp(k, 'alignment'), sign=True)}, drift "
            f"{fmt_drift(s[k]['eval'][LARGE]['drift'])}" for k in arms)
    elif finding == "online_offline":
        on, off = s[("large", "PRDP online")], s[("large", "PRDP offline")]
        held = _better(on, off, LARGE)
        text = (f"world_large_sample: gain online {fmt(on['eval'][LARGE]['gain'], sign=True)}, "
                f"offline {fmt(off['eval'][LARGE]['gain'], sign=True)} (base "
                f"{on['eval'][LARGE]['base']:.3f})")
    else:
        raise KeyError(finding)
    return held, text, rule


def _passes(summary: dict) -> str:
    by_pass = summary.get("clip_frac_by_pass")
    return ("/".join(f"{v:.2f}" for v in by_pass) if by_pass
            else f"{summary['clip_frac']:.2f} (one pass)")


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
    axes[0][0].set_ylabel("reward")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str) -> None:
    import io
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.atomic_write_bytes(path, buf.getvalue())


def plot_beta(path: str, curves: dict, name: str = LARGE) -> None:
    """The beta trade-off on `name`: the gain of the trained reward (quality) against the gain of
    the gold reward it never sees (alignment), and against the drift; one point per beta and
    seed (`curves[label]` per-seed curves of the arm 'PRDP beta=<b>')."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(sorted(curves.items(),
                                             key=lambda kv: float(kv[0].split("=")[1]))):
        e = [c["eval"][name] for c in runs]
        quality = [x["components"]["quality"][1] - x["components"]["quality"][0] for x in e]
        alignment = [x["components"]["alignment"][1] - x["components"]["alignment"][0] for x in e]
        drift = [x["drift"][-1] for x in e]
        kw = dict(color=colors[i % len(colors)], label=label.split(" ")[1])
        axes[0].scatter(alignment, quality, **kw)
        axes[1].scatter(drift, quality, **kw)
    axes[0].axvline(0, color="grey", linewidth=0.8)
    axes[0].set_xlabel("gold reward gain (alignment, not trained on)")
    axes[1].set_xlabel("drift: mean per-step log-ratio to the base")
    for ax in axes:
        ax.set_ylabel("trained reward gain (quality)")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, title="beta")
    fig.suptitle(f"beta trade-off ({name}), one point per beta and seed")
    fig.tight_layout()
    _save(fig, path)


def plot_clip(path: str, title: str, curves: dict) -> None:
    """The clip fraction of each pass (mean over epochs; one line per arm, thin per seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(curves.items()):
        if "clip_frac_by_pass" not in runs[0]:
            continue
        per_seed = [np.mean(c["clip_frac_by_pass"], axis=0) for c in runs]
        passes = np.arange(1, len(per_seed[0]) + 1)
        for y in per_seed:
            ax.plot(passes, y, color=colors[i % len(colors)], alpha=0.3, linewidth=0.8)
        ax.plot(passes, np.mean(per_seed, axis=0), color=colors[i % len(colors)], linewidth=2,
                label=label)
    ax.set_xlabel("pass over the epoch's pairs")
    ax.set_ylabel("clip fraction")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def sweep_table(sweep: dict) -> list[str]:
    """Markdown lines of the rate sweep: each method and rate's final reward on each set (its
    gain over the base), the chosen rate in bold."""
    sets = list(sweep["base"])
    lines = [f"Learning-rate sweep ({sweep['scale']} scale, seed 0; chosen on "
             f"{sweep['selected_on']}):", "",
             "| method | rate | " + " | ".join(sets) + " |", "|---|---|" + "---|" * len(sets),
             "| base | | " + " | ".join(f"{sweep['base'][n]:.4f}" for n in sets) + " |"]
    for method, rates in sweep["final_rewards"].items():
        for rate, finals in sorted(rates.items(), key=lambda kv: float(kv[0])):
            bold = "**" if float(rate) == sweep["chosen"][method] else ""
            lines.append(f"| {method.upper()} | {bold}{rate}{bold} | " + " | ".join(
                f"{finals[n]:.4f} ({finals[n] - sweep['base'][n]:+.4f})" for n in sets) + " |")
    return lines


def update_page(path: str, results_dir: str, order: Sequence[str]) -> None:
    """Rewrites the table between the markers of docs/results.md from every finding whose
    `<results_dir>/<finding>.json` exists, in `order`, followed by each one's plots (the prose
    around the markers is kept), so a finding run on its own keeps the rows of the others."""
    lines = [BEGIN, "", "| finding | paper | measured here (mean ± SE over seeds) | rule | "
                        "evaluation's power | held? |", "|---|---|---|---|---|---|"]
    figures, rel = [], os.path.relpath(results_dir, os.path.dirname(os.path.abspath(path)))
    sweep = os.path.join(results_dir, "lr_sweep.json")
    if os.path.exists(sweep):
        with open(sweep) as f:
            lines[2:2] = sweep_table(json.load(f)) + ["", "Findings:", ""]
    for name in order:
        result = os.path.join(results_dir, f"{name}.json")
        if not os.path.exists(result):
            continue
        with open(result) as f:
            r = json.load(f)
        held = {True: "yes", False: "no", None: "undecided (evaluation too small)"}[r["held"]]
        lines.append(f"| {r['finding']} | {r['paper']} | {r['measured']} | {r['rule']} | "
                     f"{r.get('power', '')} | {held} |")
        plots = sorted(p for p in os.listdir(results_dir)
                       if p.endswith(".png") and (p == f"{name}.png" or p.startswith(name + "_")))
        trained = [f"Trained on: {hosts_text(r['hosts'])}.", ""] if r.get("hosts") else []
        if plots or trained:
            figures += [f"### {r['finding']}", ""] + trained + [
                f"![{p[:-4]}]({rel}/{p})" for p in plots] + [""]
    lines += [""] + figures + [END]
    table = "\n".join(lines)
    text = open(path).read() if os.path.exists(path) else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    files.atomic_write_bytes(path, (head + table + tail).encode())
