"""The paper's findings as experiments in the embedded world.

Each finding compares arms (a method plus config overrides) at one or both prompt scales, under
the same reward-query budget (every arm samples the same prompts per epoch, images per prompt and
epochs) and the same evaluation seeds. An arm at a scale is one run of the trainer per seed; runs
shared between findings (e.g. the clipped PRDP run at large scale) are run once.

Scales:
  small  trains on `world_small` (the counterpart of the paper's 45 animals): each prompt is seen
         many times.
  large  trains on `world_large` (8,192 prompts, the counterpart of 100K+): each prompt is seen at
         most a few times within the budget.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

SCALES = ("small", "large")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One method setting. `overrides` are dotted config fields set on top of the scale's base."""

    name: str
    overrides: Mapping[str, object]

    def key(self) -> str:
        """A directory name that identifies the setting (not the label)."""
        parts = [f"{k}={v}" for k, v in sorted(self.overrides.items())]
        return ",".join(parts).replace("/", "_") or "base"


@dataclasses.dataclass(frozen=True)
class Finding:
    name: str            # file stem under docs/results/
    title: str
    paper: str           # what the paper reports
    scales: tuple        # which prompt scales it runs at
    arms: tuple          # Arm, ...; the first is the reference arm for the verdict


def prdp(**overrides) -> dict:
    return {"method": "prdp", **overrides}


def ddpo(**overrides) -> dict:
    return {"method": "ddpo", **overrides}


INF = float("inf")

FINDINGS = {
    "small_scale": Finding(
        "small_scale", "Small scale: PRDP matches DDPO",
        "45 prompts, 100 epochs: PRDP matches or slightly beats DDPO (HPSv2 0.3471 vs 0.3398)",
        ("small",),
        (Arm("PRDP", prdp()), Arm("DDPO", ddpo()))),
    "large_scale": Finding(
        "large_scale", "Large scale: PRDP keeps improving, DDPO stalls or degrades",
        "100K+ prompts: DDPO falls below the base on seen and unseen prompts (HPSv2 0.2464 vs "
        "0.2685), PRDP rises on every set (0.3175)",
        ("large",),
        (Arm("PRDP", prdp()), Arm("DDPO (per-prompt norm.)", ddpo()),
         Arm("DDPO (batch norm.)", ddpo(**{"ddpo.normalization": "batch"})))),
    "clipping": Finding(
        "clipping", "Clipping ablation",
        "Without the per-step clip PRDP diverges at both scales; at large scale DDPO with its "
        "clip still diverges (the RDP objective is needed too)",
        ("small", "large"),
        (Arm("PRDP", prdp()), Arm("PRDP, no clip", prdp(**{"prdp.clip_eps": INF})),
         Arm("DDPO", ddpo()), Arm("DDPO, no clip", ddpo(**{"ddpo.clip_range": INF})))),
    "beta": Finding(
        "beta", "KL coefficient beta: reward against drift",
        "Aesthetic reward, beta in {0.1, 1, 10}: small beta reward-hacks, larger beta keeps text "
        "alignment while still raising the reward",
        ("large",),
        ()),  # arms depend on the tuned beta; see `beta_arms`
    "online_offline": Finding(
        "online_offline", "Online against offline PRDP",
        "Online catches up with offline (pairs sampled once from the base) in about 10 epochs "
        "and keeps improving",
        ("large",),
        (Arm("PRDP online", prdp()), Arm("PRDP offline", prdp(**{"train.sampling": "offline"})))),
}

BETA_FACTORS = (0.1, 1.0, 10.0)


def beta_arms(beta: float) -> tuple:
    """PRDP at beta x {0.1, 1, 10} around the world config's beta."""
    return tuple(Arm(f"PRDP beta={beta * f:g}", prdp(**{"prdp.beta": beta * f}))
                 for f in BETA_FACTORS)


def arms_of(finding: Finding, beta: float) -> tuple:
    return beta_arms(beta) if finding.name == "beta" else finding.arms
