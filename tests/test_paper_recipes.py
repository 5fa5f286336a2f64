"""Every SD recipe equals the paper where docs/recipes.md says so, and names why where it differs."""
import ast
import math
import os
import re

import pytest

from prdp_jax import config as config_lib
from prdp_jax.training import precision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "docs", "recipes.md")


def literal(cell: str):
    return ast.literal_eval(cell.strip().strip("`"))


def sections() -> list[tuple[list[str], list[dict]]]:
    """[(recipes, rows)] of docs/recipes.md: each '## `a`, `b`: ...' heading and its table."""
    out, recipes, header = [], None, None
    with open(TABLE) as f:
        for line in f:
            if line.startswith("## "):
                recipes = re.findall(r"`([^`]+)`", line.split(":")[0])
                header = None
                if recipes:
                    out.append((recipes, []))
            elif recipes and line.startswith("|") and not line.startswith("|---"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if header is None:
                    header = cells
                else:
                    out[-1][1].append(dict(zip(header, cells)))
    return out


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def test_the_table_covers_every_prdp_recipe():
    sd = config_lib.load_module(os.path.join(config_lib.CONFIG_DIR, "sd.py"))
    covered = {r for recipes, _ in SECTIONS for r in recipes}
    assert covered == set(sd.BASE)
    assert all(rows for _, rows in SECTIONS)


SECTIONS = sections()


@pytest.mark.parametrize("recipes,rows", SECTIONS, ids=["+".join(r) for r, _ in SECTIONS])
def test_recipe_matches_the_paper_or_says_why(recipes, rows):
    for recipe in recipes:
        c = config_lib.load_named("sd", recipe)
        config_lib.validate(c)
        for row in rows:
            got = eval(row["config"].strip("`"), {"c": c, "dict": dict})  # noqa: S307
            ours, paper, why = literal(row["ours"]), literal(row["paper"]), row["why we differ"]
            assert same(got, ours), f"{recipe}: {row['what']} is {got!r}, the table says {ours!r}"
            if why:
                assert not same(ours, paper), f"{recipe}: {row['what']} equals the paper; drop the why"
            else:
                assert same(ours, paper), (f"{recipe}: {row['what']} = {ours!r} differs from the "
                                           f"paper's {paper!r} without a reason in docs/recipes.md")
        if recipe.startswith("aesthetic_beta"):
            assert same(c.prdp.beta, float(recipe[len("aesthetic_beta"):]))


def test_the_sd_recipes_score_in_the_measured_precision_and_bf16_scoring_warns():
    """The recipes' precision policy is the one docs/precision.md measured to keep the clip
    meaningful (bf16 sampling, float32 scoring of every stored transition); asking for bf16
    scoring with the paper's eps prints one warning naming the measured noise against eps."""
    import json
    with open(os.path.join(ROOT, "docs", "precision.json")) as f:
        measured = json.load(f)["policies"]
    # the constant the warning quotes is the committed measurement (1 significant digit)
    assert precision.BF16_SCORING_NOISE == float(f"{measured['bf16']['noise_median']:.0e}")
    # float32 scoring: no clip fraction at theta_old, and after one step the float32 scorer's
    chosen = measured["bf16_sample"]
    assert all(v == 0 for v in chosen["clip_frac_at_old"].values())
    assert chosen["clip_frac_one_step"] == chosen["clip_frac_one_step_float32"]
    for recipe in config_lib.load_module(os.path.join(ROOT, "configs", "sd.py")).RECIPES:
        c = config_lib.load_named("sd", recipe)
        assert (c.model.dtype, c.model.score_dtype, c.train.rescore_old) == (
            "bfloat16", "float32", True), recipe
        config_lib.validate(c)
        assert precision.warning(c) is None, recipe
        c.model.score_dtype = "bfloat16"
        eps = c.prdp.clip_eps if c.method == "prdp" else c.ddpo.clip_range
        warning = precision.warning(c)
        assert (warning is not None) == (eps < precision.BF16_SCORING_NOISE), recipe
        if warning:
            assert f"{eps:g}" in warning and f"{precision.BF16_SCORING_NOISE:.0e}" in warning
    world = config_lib.load_named("world")
    assert precision.warning(world) is None      # float32 throughout


def test_a_run_asked_to_score_in_bf16_says_so_in_one_warning_line_at_start(monkeypatch, tmp_path):
    from prdp_jax.training import loop

    class Started(Exception):
        pass

    def stop(*args, **kwargs):
        raise Started
    monkeypatch.setattr(loop.rewards_lib, "combine", stop)   # the first thing a run builds
    for score_dtype, warns in (("bfloat16", True), ("float32", False)):
        c = config_lib.load_named("sd", "small_hpsv2")
        c.model.path = str(tmp_path)
        c.model.score_dtype = score_dtype
        lines = []
        with pytest.raises(Started):
            loop.train_and_evaluate(c, str(tmp_path / "run"), log=lines.append)
        warnings = [line for line in lines if line.startswith("warning:")]
        assert len(warnings) == int(warns), lines
        if warns:
            assert "8e-03" in warnings[0] and "prdp.clip_eps=1e-06" in warnings[0]
