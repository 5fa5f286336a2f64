"""The embedded world: renderer, grammar and splits, the alignment reward, the base folder (pretrain,
resume, verify), a short finetune + evaluate run through the main entry point's code path and the
evaluation command."""
import dataclasses
import json
import os

import numpy as np
import pytest

from conftest import TINY_UNET, override, tiny_config
from prdp_jax.infra.errors import PromptError
from prdp_jax.models.tokenizers import WordTokenizer
from prdp_jax.training import loop
from prdp_jax.world import grammar, render
from prdp_jax.world.alignment import alignment_scores, score_image
from prdp_jax.world.config import add_world_sections


def scenes(n, seed=0, heldout=None):
    rng = np.random.default_rng(seed)
    return [grammar.random_scene(rng, heldout=heldout) for _ in range(n)]


def test_renderer_is_deterministic_and_jitter_is_seeded():
    sc = scenes(20)
    a, b = render.render_batch(sc), render.render_batch(sc)
    np.testing.assert_array_equal(a, b)
    j1 = render.render_batch(sc, jitter_seeds=range(20))
    j2 = render.render_batch(sc, jitter_seeds=range(20))
    np.testing.assert_array_equal(j1, j2)
    assert not np.array_equal(j1, a)
    assert a.shape == (20, 24, 24, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    # Every object is drawn with its exact palette colour and stays inside the image.
    for s, img in zip(sc, j1):
        for obj in s.objects:
            assert (np.abs(img - grammar.COLORS[obj.color]).sum(-1) < 1e-6).sum() > 0


def test_captions_round_trip_and_count():
    for s in scenes(200, heldout=None):
        assert grammar.parse(s.caption()) == s
        assert len(s.caption().split()) <= grammar.MAX_WORDS
    one = len(grammar._single_objects()) * len(grammar.BACKGROUNDS)
    assert one == 504  # one-object captions; two-object ones number 27,216


def test_unknown_words_and_bad_captions_are_named():
    with pytest.raises(PromptError, match="unknown word 'dragon'"):
        grammar.parse("a small red dragon at the top on a black background")
    with pytest.raises(PromptError, match="not a valid scene"):
        grammar.parse("a small red circle at the top left and a large red square at the bottom right "
                      "on a black background")
    with pytest.raises(PromptError, match="is not 'a <size> <colour> <shape> at the <position>'"):
        grammar.parse("a small red circle at the top on a black background")
    with pytest.raises(PromptError, match="unknown word 'zebra'"):
        WordTokenizer(grammar.VOCABULARY, 24)(["a small zebra"])


def test_splits_are_seeded_disjoint_and_hold_out_compositions():
    s = grammar.splits()
    assert (len(s.small), len(s.large), len(s.large_sample), len(s.heldout)) == (32, 8192, 64, 128)
    assert len(s.large) >= 5000
    train_set = set(s.small) | set(s.large)
    assert len(train_set) == len(s.small) + len(s.large)
    assert not set(s.small) & set(s.large)
    assert not set(s.heldout) & train_set
    assert set(s.large_sample) <= set(s.large)
    assert all(not grammar.parse(c).is_heldout() for c in train_set)
    assert all(grammar.parse(c).is_heldout() for c in s.heldout)
    assert grammar.splits(seed=0) == s and grammar.splits(seed=1).large != s.large


def test_ground_truth_scores_high_and_noise_scores_low():
    sc = scenes(300, seed=1, heldout=None)
    rewards, info = alignment_scores(render.render_batch(sc), [x.caption() for x in sc])
    assert rewards.mean() >= 0.95 and rewards.min() > 0.8
    noise = np.random.default_rng(0).random((100, 24, 24, 3)).astype(np.float32)
    assert alignment_scores(noise, [x.caption() for x in sc[:100]])[0].mean() < 0.05


OTHER = {"color": lambda o: "blue" if o.color != "blue" else "red",
         "shape": lambda o: {"square": "triangle", "circle": "square", "triangle": "circle"}[o.shape],
         "position": lambda o: {"top left": "bottom right"}.get(o.position, "top left"),
         "size": lambda o: "small" if o.size == "large" else "large"}
ATTRIBUTE = {"color": "colour", "shape": "shape", "position": "position", "size": "size"}


@pytest.mark.parametrize("field", sorted(OTHER))
def test_changing_one_attribute_lowers_that_score(field):
    rng = np.random.default_rng(3)
    drops = []
    for _ in range(40):
        s = grammar.random_scene(rng, heldout=None, two_object_prob=0.0)
        obj = s.objects[0]
        changed = dataclasses.replace(obj, **{field: OTHER[field](obj)})
        if field == "color" and changed.color == s.background:
            continue
        wrong = dataclasses.replace(s, objects=(changed,))
        truth = score_image(render.render(s), s)
        scored = score_image(render.render(wrong), s)  # an image of the wrong scene, true caption
        assert scored["total"] < truth["total"]
        drops.append(truth[ATTRIBUTE[field]] - scored[ATTRIBUTE[field]])
    assert np.mean(drops) > 0.5


def test_changing_the_background_lowers_its_score():
    s = scenes(1, seed=5)[0]
    other = next(b for b in grammar.BACKGROUNDS if b != s.background
                 and all(o.color != b for o in s.objects))
    wrong = dataclasses.replace(s, background=other)
    assert score_image(render.render(wrong), s)["background"] < 0.1
    assert score_image(render.render(s), s)["background"] > 0.8


def tiny_world_config(base_dir, **overrides):
    c = add_world_sections(tiny_config())
    c.model.source = "world"
    c.world.base_dir = str(base_dir)
    c.world.small_prompts, c.world.large_prompts = 8, 64
    c.world.large_sample_prompts, c.world.heldout_prompts = 4, 4
    c.model.unet.update(dict(TINY_UNET, sample_size=24))
    c.model.text_encoder.max_position_embeddings = 24
    c.schedule.beta_schedule, c.schedule.beta_start, c.schedule.beta_end = "linear", 1e-4, 0.02
    c.schedule.timestep_spacing = "trailing"
    c.schedule.prediction_type = "v_prediction"
    c.prompts.train = "world_large"
    c.reward.weights = {"preference": 1.0}
    c.pretrain.steps, c.pretrain.batch_size = 6, 8
    c.eval.sets = ("world_small", "world_heldout")
    c.eval.samples_per_prompt, c.eval.batch_size, c.eval.max_prompts = 2, 8, 4
    c.train.epochs = 2
    return override(c, **overrides)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny base pretrained for 6 steps and written as a verified folder (with its state)."""
    from prdp_jax.world import base
    root = tmp_path_factory.mktemp("world") / "base"
    logs = []
    base.pretrain_base(tiny_world_config(root), str(root), str(root) + ".state", log=logs.append,
                       show_progress=False)
    assert any("wrote the base" in line for line in logs)
    return root


@pytest.mark.slow
def test_pretraining_resumes_bitwise(tmp_path, tiny_base, monkeypatch):
    """Pretraining killed in step 5 of 6 (saved at 4) and rerun writes the same weights, byte for
    byte, as an uninterrupted run."""
    from prdp_jax.world import base
    config = lambda: tiny_world_config(tmp_path / "b", **{"pretrain.checkpoint_every": 4})
    real = base.batches

    def dying(config, tokenizer):
        fn = real(config, tokenizer)

        def batch(step):
            if step == 5:
                raise KeyboardInterrupt
            return fn(step)
        return batch

    monkeypatch.setattr(base, "batches", dying)
    state = str(tmp_path / "state")
    with pytest.raises(KeyboardInterrupt):
        base.pretrain_base(config(), str(tmp_path / "b"), state, show_progress=False)
    assert not os.path.exists(tmp_path / "b")
    monkeypatch.setattr(base, "batches", real)
    logs = []
    base.pretrain_base(config(), str(tmp_path / "b"), state, log=logs.append, show_progress=False)
    assert any("resuming pretraining from step 4 of 6" in line for line in logs)
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (tmp_path / "b" / rel).read_bytes() == (tiny_base / rel).read_bytes()


@pytest.mark.slow
def test_pretrain_finetune_evaluate_smoke(tmp_path, tiny_base):
    logs = []
    out = loop.train_and_evaluate(tiny_world_config(tiny_base), str(tmp_path / "run"),
                                   log=logs.append)
    assert any(f"pixel-space model from {tiny_base}" in line for line in logs)
    summary = json.load(open(tmp_path / "run" / "eval" / "summary.json"))
    for label in ("before", "after"):
        for name in ("world_small", "world_heldout"):
            r = summary[label][name]
            assert 0 <= r["reward_mean"] <= 1 and r["prompts"] == 4 and r["samples_per_prompt"] == 2
            assert {f"preference/{k}" for k in ("background", "colour", "shape", "position", "size",
                                               "count")} <= set(r["components"])
            assert os.path.exists(tmp_path / "run" / "eval" / f"{label}_{name}.png")
    assert os.path.exists(tmp_path / "run" / "eval" / "before_after_world_heldout.png")
    assert summary["before"]["world_small"]["drift_mean"] == 0.0  # the reference against itself
    assert out["after"]["world_small"]["drift_mean"] != 0.0

    # The evaluation command reproduces the run's own evaluation from its checkpoint, and takes
    # other sets, seeds and caption files.
    from prdp_jax import evaluate
    config = json.load(open(tmp_path / "run" / "config.json"))
    import ml_collections
    config = ml_collections.ConfigDict(config)
    again = evaluate.evaluate_checkpoint(config, str(tmp_path / "run"), None, False,
                                         str(tmp_path / "ev" / "out.json"), log=logs.append,
                                         show_progress=False)
    for label in ("before", "after"):
        for name in ("world_small", "world_heldout"):
            assert again[label][name]["per_prompt_reward"] == summary[label][name]["per_prompt_reward"]
    written = json.load(open(tmp_path / "ev" / "out.json"))
    assert written["epoch"] == 2 and written["table"] == again["table"]
    captions = tmp_path / "captions.txt"
    captions.write_text("a small red square at the top left on a black background\n"
                        "a large blue square at the bottom right on a white background\n")
    config.eval.sets = (f"file:{captions}",)
    config.eval.seed, config.eval.samples_per_prompt = 7, 3
    other = evaluate.evaluate_checkpoint(config, str(tmp_path / "run"), 2, True, None,
                                         log=logs.append, show_progress=False)
    assert "after" not in other and other["before"][f"file:{captions}"]["prompts"] == 2
    assert other["before"][f"file:{captions}"]["samples_per_prompt"] == 3


@pytest.mark.slow
def test_world_base_refuses_altered_files_and_other_worlds(tmp_path, tiny_base):
    import shutil

    from prdp_jax.infra.errors import ConfigError, WeightsError
    from prdp_jax.world import base
    config = tiny_world_config(tiny_base)
    assert base.open_base(config).unet.sample_size == 24  # the intact folder opens
    bad = tmp_path / "bad"
    shutil.copytree(tiny_base, bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors: its SHA-256 differs"):
        base.open_base(tiny_world_config(bad))
    weights.write_bytes(bytes(data[:100]))
    with pytest.raises(WeightsError, match=r"safetensors: 100 bytes, the manifest says"):
        base.open_base(tiny_world_config(bad))
    weights.unlink()
    with pytest.raises(WeightsError, match=r"safetensors: missing"):
        base.open_base(tiny_world_config(bad))
    with pytest.raises(ConfigError, match=r"different world config .*world\.large_prompts: base 64, "
                                          r"config 65"):
        base.open_base(tiny_world_config(tiny_base, **{"world.large_prompts": 65}))
    # Evaluation split sizes are not part of the base.
    base.open_base(tiny_world_config(tiny_base, **{"world.heldout_prompts": 9}))
    with pytest.raises(ConfigError, match=r"does not exist; make a base there with python -m "
                                          r"prdp_jax\.world\.pretrain"):
        base.open_base(tiny_world_config(tmp_path / "nothing"))


@pytest.mark.slow
def test_captions_outside_the_grammar_stop_before_any_work(tmp_path, tiny_base):
    captions = tmp_path / "captions.txt"
    captions.write_text("a small red square at the top left on a black background\n"
                        "a small red square at the top on a black background\n")
    config = tiny_world_config(tiny_base, **{"eval.sets": (f"file:{captions}",)})
    with pytest.raises(PromptError, match=r"file:.*captions\.txt, prompt 2: caption 'a small red "
                                          r"square at the top on a black background'"):
        loop.train_and_evaluate(config, str(tmp_path / "run"), log=lambda *a: None)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_reward_change_gets_a_paired_standard_error():
    from prdp_jax.training import evaluation as evaluate
    before = {"s": dict(prompts=3, reward_mean=0.2, reward_se=0.0577,
                        per_prompt_reward=[0.1, 0.2, 0.3])}
    after = {"s": dict(prompts=3, reward_mean=0.31667, reward_se=0.0928, drift_mean=0.01,
                       drift_se=0.001, per_prompt_reward=[0.2, 0.25, 0.5])}
    # Differences 0.1, 0.05, 0.2: sample std 0.07638, over sqrt(3) prompts 0.04410.
    assert evaluate.change_se(before["s"], after["s"]) == pytest.approx(0.04410, abs=1e-5)
    row = evaluate.table(before, after)[1]
    assert "+0.1167 ± 0.0441" in row
    # Results without per-prompt rewards (older JSON) still print, without the paired error.
    del before["s"]["per_prompt_reward"]
    assert evaluate.change_se(before["s"], after["s"]) is None
    assert "+0.1167  " in evaluate.table(before, after)[1]


# ---- Degraded pretraining data and the preference reward ----

def test_degradations_are_drawn_independently_of_captions_and_avoid_heldout_pairs():
    from prdp_jax.world import degrade
    captions = [s.caption() for s in scenes(400, seed=3)]
    images, kinds = degrade.pretraining_batch(captions, 24, np.random.default_rng(0))
    again, kinds_again = degrade.pretraining_batch(captions, 24, np.random.default_rng(0))
    np.testing.assert_array_equal(images, again)
    assert kinds == kinds_again and images.shape == (400, 24, 24, 3)
    assert 0 <= images.min() and images.max() <= 1
    share = {k: kinds.count(k) / len(kinds) for k in degrade.KINDS}
    for k, p in degrade.DEGRADATIONS.items():  # binomial SE at n=400 is at most 0.025
        assert abs(share[k] - p) < 0.08, (k, share[k], p)
    rng = np.random.default_rng(1)
    for s in scenes(300, seed=4, heldout=False):
        for changed in (degrade.misplaced(s, rng), degrade.misshapen(s, rng)):
            assert changed != s and not changed.is_heldout()
            assert grammar.parse(changed.caption()) == changed  # still a valid scene


def test_preference_reward_ranks_truth_above_every_degradation():
    from prdp_jax.world import degrade
    from prdp_jax.world.preference import preference_scores
    from prdp_jax.world.quality import quality_scores
    sc = scenes(120, seed=6)
    captions = [s.caption() for s in sc]
    truth, info = preference_scores(render.render_batch(sc), captions)
    assert truth.min() >= 0.95 and info["quality"].min() >= 0.95
    rng = np.random.default_rng(2)
    for kind in degrade.KINDS[1:]:
        images = np.stack([degrade.degrade(s, kind, 24, rng) for s in sc])
        value, parts = preference_scores(images, captions)
        assert value.mean() < truth.mean() - 0.04, kind
        # The image degradations lower the caption-blind quality; the others lower alignment.
        lowered = "quality" if kind in ("blur", "noise", "faded", "tinted") else "alignment"
        assert parts[lowered].mean() < info[lowered].mean() - 0.05, kind
        assert (value <= 1).all() and (value >= 0).all()
    # Each wrong attribute lowers the score (alignment's checks, see test above); quality never
    # reads the caption.
    shuffled = captions[1:] + captions[:1]
    np.testing.assert_array_equal(quality_scores(render.render_batch(sc), shuffled)[0],
                                  quality_scores(render.render_batch(sc), captions)[0])
    assert preference_scores(render.render_batch(sc), shuffled)[0].mean() < truth.mean() - 0.2
    noise = np.random.default_rng(0).uniform(size=(50, 24, 24, 3)).astype(np.float32)
    assert preference_scores(noise, captions[:50])[0].mean() < 0.05
    grey = np.clip(0.5 + 0.25 * np.random.default_rng(1).normal(size=(50, 24, 24, 3)), 0, 1)
    assert preference_scores(grey.astype(np.float32), captions[:50])[0].mean() < 0.05


def test_evaluation_command_refuses_a_run_without_checkpoints(tmp_path, capsys):
    from prdp_jax import evaluate
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(tiny_world_config(tmp_path).to_dict()))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--workdir", str(tmp_path / "run"), "--sets", "world_heldout"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: ") and "has no checkpoint to evaluate" in err[0]
    with pytest.raises(SystemExit):
        evaluate.main(["--sets", "world_heldout"])
    assert "give --workdir RUN" in capsys.readouterr().err
