"""Every SD recipe equals the paper where docs/recipes.md says so, and names why where it differs."""
import ast
import math
import os
import re

import pytest

from prdp_jax import config as config_lib

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
