"""Prompt files in every format (the published layouts of HPDv2 and Pick-a-Pic), their presets and
errors, their use as evaluation sets, and the configs/sd.py recipes (Table 4) loading without any
weights on disk."""
import csv
import json
import os
import sys

import pytest

from conftest import tiny_config
from prdp_jax import config as config_lib
from prdp_jax.infra.errors import ConfigError, PromptError
from prdp_jax.prompts import files
from prdp_jax.prompts import sets as prompt_sets
from prdp_jax.training import evaluation
from test_train import load_config


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_every_format_reads(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    txt = write(tmp_path / "p.txt", "a cat\n\n  a dog  \n")
    jsonl = write(tmp_path / "p.jsonl", '{"prompt": "a cat", "n": 1}\n\n{"prompt": "a dog"}\n')
    strings = write(tmp_path / "s.jsonl", '"a cat"\n"a dog"\n')
    js = write(tmp_path / "p.json", json.dumps(["a cat", "a dog"]))
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "caption"])
        w.writerows([[1, "a cat"], [2, "a dog, running"]])
    write(tmp_path / "one.csv", "text\na cat\na dog\n")
    pq.write_table(pa.table({"caption": ["a cat", "a dog"], "jpg_0": [b"\xff\xd8", b"\xff\xd8"]}),
                   tmp_path / "p.parquet")
    assert files.read_prompts(txt) == ["a cat", "a dog"]
    assert files.read_prompts(jsonl, "prompt") == ["a cat", "a dog"]
    assert files.read_prompts(strings) == ["a cat", "a dog"]
    assert files.read_prompts(js) == ["a cat", "a dog"]
    assert files.read_prompts(str(tmp_path / "p.csv"), "caption") == ["a cat", "a dog, running"]
    assert files.read_prompts(str(tmp_path / "one.csv")) == ["a cat", "a dog"]
    assert files.read_prompts(str(tmp_path / "p.parquet"), "caption") == ["a cat", "a dog"]
    # file: specs, with #FIELD or prompts.field
    config = tiny_config()
    assert prompt_sets.load(f"file:{tmp_path / 'p.csv'}#caption", config)[1] == "a dog, running"
    config.prompts.field = "prompt"
    assert prompt_sets.load(f"file:{jsonl}", config) == ["a cat", "a dog"]


def test_presets_read_the_published_layouts(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    # HPDv2 train.json: one record per annotated pair, prompts repeat.
    records = [{"prompt": f"prompt {i // 2}", "image_path": [f"{i}a.jpg", f"{i}b.jpg"],
                "human_preference": [1, 0]} for i in range(1300)]
    write(tmp_path / "train.json", json.dumps(records))
    # HPDv2 benchmark: a JSON list of strings per style.
    write(tmp_path / "anime.json", json.dumps([f"anime {i}" for i in range(800)]))
    # Pick-a-Pic v1: parquet shards with a caption column (and image bytes), repeats per pair.
    shards = tmp_path / "pickapic"
    shards.mkdir()
    for s in range(2):
        pq.write_table(pa.table({"caption": [f"cap {s} {i % 3}" for i in range(6)],
                                 "jpg_0": [b"x"] * 6, "label_0": [0.5] * 6}),
                       shards / f"test-0000{s}-of-00002.parquet")
    config = tiny_config()
    config.prompts.files.hpdv2_train = str(tmp_path / "train.json")
    config.prompts.files.hpdv2_anime = str(tmp_path / "anime.json")
    config.prompts.files.pickapic_v1_test = str(shards / "test-*.parquet")
    train = prompt_sets.load("hpdv2_train", config)
    assert len(train) == 650 and train[:2] == ["prompt 0", "prompt 1"]
    seen = prompt_sets.load("hpdv2_train_seen500", config)
    assert len(seen) == 500 and set(seen) <= set(train)
    assert seen == prompt_sets.load("hpdv2_train_seen500", config)   # fixed sample
    assert len(prompt_sets.load("hpdv2_anime", config)) == 800
    assert prompt_sets.load("pickapic_v1_test", config) == [f"cap {s} {i}" for s in range(2)
                                                           for i in range(3)]
    config.prompts.files.pickapic_v1_test = str(shards)              # a folder of shards works too
    assert len(prompt_sets.load("pickapic_v1_test", config)) == 6

    # As evaluation sets: Evaluator.run_sets loads each by name and files results by a safe label.
    seen_runs = []

    class Recorder(evaluation.Evaluator):
        def __init__(self, config):
            self.config = config

        def run(self, params, ref, frozen, prompts, samples, name, grid_path, show):
            seen_runs.append((name, len(prompts), os.path.basename(grid_path)))
            return {"reward_mean": 0.0}

    config.eval.sets = ("hpdv2_anime", f"file:{tmp_path / 'anime.json'}")
    config.eval.max_prompts = 10
    Recorder(config).run_sets(None, None, None, "before", str(tmp_path / "run"), False)
    assert seen_runs[0] == ("hpdv2_anime", 10, "before_hpdv2_anime.png")
    assert seen_runs[1][1] == 10 and "/" not in seen_runs[1][2][len("before_"):]
    assert os.path.exists(tmp_path / "run" / "eval" / "before.json")


def test_prompt_file_errors_are_one_clear_line(tmp_path, monkeypatch):
    config = tiny_config()
    with pytest.raises(ConfigError, match=r"prompt set 'hpdv2_photo' reads a file you download: set "
                                          r"--config.prompts.files.hpdv2_photo=PATH \(benchmark/photo.json"):
        prompt_sets.load("hpdv2_photo", config)
    with pytest.raises(ConfigError, match="prompt file .*nope.json not found"):
        prompt_sets.load(f"file:{tmp_path / 'nope.json'}", config)
    objs = write(tmp_path / "o.json", json.dumps([{"caption": "a"}]))
    with pytest.raises(PromptError, match=r"o.json item 0: no key 'prompt'; keys: \['caption'\]"):
        files.read_prompts(objs, "prompt")
    with pytest.raises(PromptError, match="an object; name its prompt key"):
        files.read_prompts(objs)
    bad = write(tmp_path / "b.jsonl", '"a"\n{oops\n')
    with pytest.raises(PromptError, match="b.jsonl line 2: not JSON"):
        files.read_prompts(bad)
    with pytest.raises(PromptError, match="holds no prompts"):
        files.read_prompts(write(tmp_path / "e.txt", "\n \n"))
    with pytest.raises(ConfigError, match="unknown format"):
        files.read_prompts(write(tmp_path / "x.xlsx", "a"))
    with pytest.raises(ConfigError, match="unknown prompt set 'nope'.*file:PATH"):
        prompt_sets.load("nope", config)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ConfigError, match=r"reading parquet prompt files needs pyarrow"):
        files.read_prompts(write(tmp_path / "p.parquet", "not parquet"), "caption")


REWARD_NAMES = {"aesthetic", "pickscore", "hpsv2", "clipscore"}


def test_sd_recipes_match_table_4_and_load_without_weights():
    sd = config_lib.load_module(os.path.join(config_lib.CONFIG_DIR, "sd.py"))
    table4 = {  # (E, K passes, N, B, beta, eps, lr) of Table 4
        "small": (100, 10, 32, 16, 3e-5, 1e-6, 1e-5),
        "large": (1000, 1, 64, 8, 3e-6, 1e-4, 7e-6),
        "large_multi": (1000, 1, 64, 8, 3e-5, 1e-4, 1e-5),
    }
    for recipe in sd.RECIPES:
        c = load_config("sd", recipe)
        config_lib.validate(c)
        t = c.train
        assert c.model.source == "diffusers" and c.model.path == ""   # no weights needed to load
        assert set(c.reward.weights) <= REWARD_NAMES, recipe
        assert t.prompts_per_epoch * t.images_per_prompt == 512, recipe   # reward budget
        assert c.hardware and c.sample.num_steps == 50 and c.sample.guidance_scale == 5.0
        assert c.method == ("ddpo" if recipe.startswith("ddpo_") else "prdp")
        if c.method == "prdp" and not recipe.startswith("aesthetic"):
            key = ("large_multi" if recipe == "large_multi" else recipe.split("_")[0])
            E, K, N, B, beta, eps, lr = table4[key]
            assert (t.epochs, t.passes_per_epoch, t.prompts_per_epoch, t.images_per_prompt,
                    c.prdp.beta, c.prdp.clip_eps, t.learning_rate) == table4[key], recipe
    assert dict(load_config("sd", "large_multi").reward.weights) == {
        "pickscore": 10.0, "hpsv2": 2.0, "aesthetic": 0.05}
    assert [load_config("sd", f"aesthetic_beta{b}").prdp.beta for b in ("0.1", "1", "10")] == [0.1, 1.0, 10.0]
    c = load_config("sd", "large_hpsv2")
    for field in ("clip_path", "mlp_path"):
        assert c.reward.aesthetic[field] == ""
    assert c.reward.hpsv2.version and "checkpoint" in c.reward.hpsv2 and "path" in c.reward.pickscore
    with pytest.raises(ConfigError, match="unknown recipe 'nope' for sd"):
        load_config("sd", "nope")


def test_animals_prompts_follow_the_paper():
    prompts = prompt_sets.load("animals")
    assert len(prompts) == 45 and prompts[0] == "a painting of a cat"
