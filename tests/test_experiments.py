"""The paper's findings in the embedded world: `python -m prdp_jax.experiments all --quick` runs
every experiment end to end (a tiny world model, 2 epochs, 1 seed) and writes its results."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINDINGS = ("small_scale", "large_scale", "clipping", "beta", "online_offline")


@pytest.mark.slow
def test_quick_experiments_write_every_finding(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "runs" / "results"
    proc = subprocess.run([sys.executable, "-m", "prdp_jax.experiments", "all", "--quick",
                           f"--runs={runs}", f"--out={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1500,  # the user's default CPU device split
                          env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = json.loads((out / "lr_sweep.json").read_text())
    assert set(sweep["chosen"]) == {"prdp", "ddpo"}
    for name in FINDINGS:
        result = json.loads((out / f"{name}.json").read_text())
        assert result["held"] in (True, False, None) and result["measured"] and result["rule"]
        assert result["power"] and isinstance(result["powered"], bool)
        for arm in result["arms"].values():
            curve = arm["curves"][0]
            assert curve["eval"]["world_heldout"]["queries"][0] == 0  # the base model first
            assert len(curve["train_reward"]) == 2
    assert (out / "beta_tradeoff.png").stat().st_size > 0
    # K > 1 passes: the clip fraction is recorded pass by pass and plotted
    small = json.loads((out / "small_scale.json").read_text())["arms"]["small/PRDP"]
    assert [len(p) for p in small["curves"][0]["clip_frac_by_pass"]] == [2, 2]
    assert len(small["summary"]["clip_frac_by_pass"]) == 2
    assert (out / "clipping_small_clip.png").stat().st_size > 0
    # the beta finding trains on quality alone and records both components
    beta = json.loads((out / "beta.json").read_text())
    assert beta["reward"] == {"quality": 1.0, "alignment": 0.0}
    for arm in beta["arms"].values():
        assert set(arm["summary"]["eval"]["world_large_sample"]["components_gain"]) == {
            "alignment", "quality"}
    # the page and plots come back from the records alone
    page_before = (runs / "results.md").read_text()
    (runs / "results.md").unlink()
    proc = subprocess.run([sys.executable, "-m", "prdp_jax.experiments", "all", "--quick",
                           "--from-records", f"--runs={runs}", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (runs / "results.md").read_text() == page_before
    assert "training" not in proc.stdout
    # the clip's calibration (one step from the base) on the same tiny world
    calibration = tmp_path / "clip_calibration.json"
    proc = subprocess.run([sys.executable, "-m", "prdp_jax.experiments.calibrate", "--quick",
                           f"--runs={runs}", f"--out={calibration}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = json.loads(calibration.read_text())
    q = c["quantiles"]
    assert 0 < q["25"] <= q["50"] <= q["75"] and c["clip"] == float(f"{q['50']:.0e}")
    # One reference evaluation per reward, shared by every run under it (the world's reward and
    # the beta finding's quality + gold): each curve starts at its numbers.
    shared = sorted((runs / "before").iterdir())
    assert len(shared) == 2
    bases = {json.loads(p.read_text())["world_heldout"]["reward_mean"] for p in shared}
    for name in FINDINGS:
        starts = {arm["curves"][0]["eval"]["world_heldout"]["reward"][0]
                  for arm in json.loads((out / f"{name}.json").read_text())["arms"].values()}
        assert len(starts) == 1 and starts <= bases, name
    page = (runs / "results.md").read_text()
    assert all(json.loads((out / f"{n}.json").read_text())["finding"] in page for n in FINDINGS)


def test_reference_evaluation_key_ignores_the_method_and_reads_the_evaluation():
    from prdp_jax import config as config_lib
    from prdp_jax.experiments import findings, runner
    size = runner.SIZES["quick"]
    prdp = runner.run_config(size, "small", findings.Arm("PRDP", {"method": "prdp"}), 0, {})
    key = runner.reference_key(prdp)
    ddpo = runner.run_config(size, "large", findings.Arm("DDPO", {"method": "ddpo",
                                                                  "ddpo.clip_range": 1.0}), 2, {})
    ddpo.train.learning_rate, ddpo.prdp.beta = 1.0, 1.0
    assert runner.reference_key(ddpo) == key
    for field, value in [("eval.seed", 1), ("sample.guidance_scale", 1.0),
                         ("world.base_dir", "/elsewhere"), ("eval.max_prompts", 3),
                         ("train.microbatch_steps", 1),
                         ("prompts.files.hpdv2_anime", "/anime.json")]:
        other = runner.run_config(size, "small", findings.Arm("PRDP", {"method": "prdp"}), 0, {})
        config_lib.set_field(other, field, value)
        assert runner.reference_key(other) != key, field


def test_results_page_keeps_every_finished_finding_and_the_prose(tmp_path):
    from prdp_jax.experiments import report
    out, page = tmp_path / "results", tmp_path / "results.md"
    out.mkdir()
    page.write_text(f"# Results\n\nIntro.\n\n{report.BEGIN}\nold table\n{report.END}\n\nNotes.\n")
    for name, held in (("beta", False), ("small_scale", True), ("clipping", None)):
        (out / f"{name}.json").write_text(json.dumps(
            {"finding": f"title {name}", "paper": "p", "measured": f"m {name}", "rule": "r",
             "power": "se", "held": held,
             "hosts": {"CPU A (AVX2), JAX 1": 1, "CPU B (AVX-512), JAX 1": 17}
             if name == "beta" else {}}))
    (out / "lr_sweep.json").write_text(json.dumps(
        {"scale": "large", "selected_on": "world_large_sample", "chosen": {"prdp": 1e-4},
         "base": {"world_large_sample": 0.75},
         "final_rewards": {"prdp": {"0.0003": {"world_large_sample": 0.76},
                                    "0.0001": {"world_large_sample": 0.77}}}}))
    for plot in ("beta.png", "beta_tradeoff.png", "clipping_small_clip.png", "betas.png"):
        (out / plot).write_bytes(b"png")
    report.update_page(str(page), str(out), FINDINGS)
    text = page.read_text()
    assert text.startswith("# Results\n\nIntro.\n\n") and text.endswith("\n\nNotes.\n")
    assert "old table" not in text and "large_scale" not in text
    rows = [line for line in text.splitlines() if line.startswith("| title")]
    assert rows == ["| title small_scale | p | m small_scale | r | se | yes |",
                    "| title clipping | p | m clipping | r | se | undecided (evaluation too "
                    "small) |",
                    "| title beta | p | m beta | r | se | no |"]  # in the findings' order
    # the rate sweep first, rates in order, the chosen one in bold, gains over the base
    assert [line for line in text.splitlines() if line.startswith("| PRDP")] == [
        "| PRDP | **0.0001** | 0.7700 (+0.0200) |", "| PRDP | 0.0003 | 0.7600 (+0.0100) |"]
    # each finding's plots follow the table, linked relative to the page
    figures = [line for line in text.splitlines() if line.startswith(("### ", "!["))]
    assert figures == ["### title clipping",
                       "![clipping_small_clip](results/clipping_small_clip.png)",
                       "### title beta", "![beta](results/beta.png)",
                       "![beta_tradeoff](results/beta_tradeoff.png)"]
    # which machines trained a finding's runs, where its result names them
    assert [line for line in text.splitlines() if line.startswith("Trained on")] == [
        "Trained on: 17 runs on CPU B (AVX-512), JAX 1; 1 on CPU A (AVX2), JAX 1."]


def test_a_recorded_run_is_read_back_only_while_its_config_matches(tmp_path, monkeypatch):
    from prdp_jax.experiments import findings, runner
    from prdp_jax.infra import runtime
    from prdp_jax.training import loop as train
    size = runner.SIZES["quick"]
    config = runner.run_config(size, "small", findings.Arm("PRDP", {"method": "prdp"}), 0, {})
    record = tmp_path / "results" / "runs" / "seed0.json"
    record.parent.mkdir(parents=True)
    kept = {"queries": [16], "train_reward": [0.5], "drift": [0.01], "eval": {}}
    record.write_text(json.dumps({"config": json.loads(runner.to_json(config)), "curve": kept}))

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")
    monkeypatch.setattr(train, "train_and_evaluate", no_training)
    assert runner.run(config, str(tmp_path / "run"), record=str(record)) == kept

    trained = []

    def fake_training(config, workdir, log=print):  # writes what a finished run leaves
        trained.append(workdir)
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"epoch": 1, "reward_mean": 0.7, "drift": 0.02, "clip_frac": 0.1,
                                "clip_frac/pass1": 0.0, "clip_frac/pass2": 0.2}) + "\n")
        for label, value in (("before", 0.1), ("after", 0.3)):
            with open(os.path.join(workdir, "eval", f"{label}.json"), "w") as f:
                json.dump({n: {"reward_mean": value, "reward_se": 0.01, "drift_mean": 0.0}
                           for n in config.eval.sets}, f)
    monkeypatch.setattr(train, "train_and_evaluate", fake_training)
    config.seed = 1  # another run: the record no longer applies
    out = runner.run(config, str(tmp_path / "run"), record=str(record))
    assert trained and out["train_reward"] == [0.7]
    assert out["eval"]["world_heldout"]["reward"] == [0.1, 0.3]
    assert out["clip_frac_by_pass"] == [[0.0, 0.2]]  # the small scale's K = 2 passes
    assert json.loads(record.read_text()) == {"config": json.loads(runner.to_json(config)),
                                              "curve": out, "host": runtime.host()}


def test_new_runs_join_records_only_from_the_same_base():
    """Another CPU's rounding of the same base's evaluation (~1e-6) is admitted; another base
    (a difference of a fair part of the evaluation's SE) is refused with one error line."""
    from prdp_jax.experiments import runner
    from prdp_jax.infra.errors import UserError
    recorded = {"world_small": 0.7436163425445557}
    here = {"world_small": {"reward_mean": 0.7436160445213318, "reward_se": 0.017}}
    runner.check_base(here, recorded, "docs/results/runs")
    here["world_small"]["reward_mean"] = 0.7436163425445557 + 0.002 * 0.017
    with pytest.raises(UserError, match="world_small: 0.743650 here, 0.743616 there"):
        runner.check_base(here, recorded, "docs/results/runs")


def test_an_arm_set_to_a_config_default_shares_the_plain_arms_runs():
    from prdp_jax.experiments import findings, runner
    size = runner.SIZES["full"]
    beta = runner.world_config(size.recipe).prdp.beta
    plain = findings.Arm("PRDP", {"method": "prdp"})
    same = findings.Arm("PRDP beta", {"method": "prdp", "prdp.beta": beta})
    other = findings.Arm("PRDP beta", {"method": "prdp", "prdp.beta": beta * 10})
    assert runner.arm_key(size, same) == runner.arm_key(size, plain) == "method=prdp"
    assert runner.arm_key(size, other) == f"method=prdp,prdp.beta={beta * 10}"


def test_each_scale_runs_its_regime_and_the_beta_finding_its_reward():
    from prdp_jax.experiments import findings, runner
    size = runner.SIZES["full"]
    arm = findings.Arm("PRDP", {"method": "prdp"})
    small = runner.run_config(size, "small", arm, 0, {})
    large = runner.run_config(size, "large", arm, 0, {})
    large_k = runner.run_config(size, "large_k", arm, 0, {})
    assert (small.prompts.train, large.prompts.train, large_k.prompts.train) == (
        "world_small", "world_large", "world_large")
    # the paper's small-scale regime: K = 10 passes of one step over all the epoch's pairs
    assert small.train.passes_per_epoch == large_k.train.passes_per_epoch == 10
    assert small.train.prompts_per_minibatch == small.train.prompts_per_epoch
    # the main job's regime at large scale
    world = runner.world_config("prdp")
    for field in ("epochs", "prompts_per_epoch", "images_per_prompt", "prompts_per_minibatch",
                  "passes_per_epoch"):
        assert getattr(large.train, field) == getattr(world.train, field), field
    beta = runner.run_config(size, "large", arm, 0, {}, reward=findings.FINDINGS["beta"].reward)
    assert dict(beta.reward.weights) == {"quality": 1.0, "alignment": 0.0}
    assert dict(large.reward.weights) == dict(world.reward.weights)
    # every arm of a finding has one scale's budget: equal reward queries and updates
    for f in findings.FINDINGS.values():
        for scale in f.scales:
            r = size.scales[scale].regime
            assert r.queries == r.epochs * r.prompts_per_epoch * r.images_per_prompt


def _curve(base, final, clip=(0.0, 0.0), quality=(0.5, 0.5), alignment=(0.5, 0.5)):
    return {"clip_frac": [0.0], "clip_frac_by_pass": [list(clip)],
            "eval": {n: {"reward": [base, final], "drift": [0.0, 0.01], "gain_se": 0.001,
                         "components": {"quality": list(quality), "alignment": list(alignment)}}
                     for n in ("world_small", "world_large_sample", "world_heldout")}}


def test_base_spread_names_only_the_sets_whose_runs_start_apart():
    from prdp_jax.experiments import report
    same = [_curve(0.2, 0.3), _curve(0.2, 0.25)]
    assert report.base_spread(same) == {}
    apart = same + [{"eval": {**_curve(0.2, 0.3)["eval"],
                              "world_heldout": {"reward": [0.1868, 0.2], "drift": [0, 0]}}}]
    assert report.base_spread(apart) == {"world_heldout": [0.1868, 0.2]}


def test_clipping_holds_only_where_the_clip_binds_and_removing_it_costs_reward():
    from prdp_jax.experiments import report

    def arms(clipped, unclipped, clip=(0.0, 0.3)):
        s = {}
        for scale in ("small", "large_k"):
            s[(scale, "PRDP")] = report.summarise([_curve(0.2, v, clip) for v in clipped])
            s[(scale, "PRDP, no clip")] = report.summarise([_curve(0.2, v) for v in unclipped])
            s[(scale, "DDPO")] = s[(scale, "DDPO, no clip")] = s[(scale, "PRDP")]
        return s
    assert report.verdict("clipping", arms([0.30, 0.31, 0.32], [0.20, 0.21, 0.22]))[0]
    # the two arms end level: the paper's "the clip is needed" fails
    assert not report.verdict("clipping", arms([0.30, 0.31, 0.32], [0.30, 0.31, 0.32]))[0]
    # a clip that never binds has not been tested, whatever the rewards
    assert not report.verdict("clipping", arms([0.30, 0.31, 0.32], [0.20, 0.21, 0.22],
                                               clip=(0.0, 0.01)))[0]


def test_beta_holds_when_small_beta_hacks_the_gold_reward_and_a_larger_one_does_not():
    from prdp_jax.experiments import report

    def sweep(per_beta):  # beta -> [(quality gain, alignment gain)] per seed
        return {("large", f"PRDP beta={b:g}"): report.summarise(
            [_curve(0.5, 0.5, quality=(0.5, 0.5 + q), alignment=(0.5, 0.5 + a)) for q, a in seeds])
            for b, seeds in per_beta.items()}
    jitter = (-0.001, 0.0, 0.001)
    hacked = [(0.05 + j, -0.03 + j) for j in jitter]
    kept = [(0.02 + j, 0.0 + j) for j in jitter]
    still = [(0.0 + j, 0.0 + j) for j in jitter]
    assert report.verdict("beta", sweep({0.01: hacked, 1.0: kept, 100.0: still}))[0]
    assert not report.verdict("beta", sweep({0.01: kept, 1.0: kept, 100.0: still}))[0]  # no hack
    assert not report.verdict("beta", sweep({0.01: hacked, 1.0: hacked, 100.0: still}))[0]


def test_a_verdict_is_undecided_where_the_evaluation_cannot_see_the_effect():
    from prdp_jax.experiments import report
    s = {("small", "PRDP"): report.summarise([_curve(0.2, 0.23)] * 3)}
    assert report.power("small_scale", s)[0]           # SE 0.001 vs effect 0.03
    weak = _curve(0.2, 0.201)
    assert not report.power("small_scale", {("small", "PRDP"): report.summarise([weak] * 3)})[0]


def test_a_saved_reference_evaluation_is_reused_only_under_the_same_evaluation_settings():
    """A workdir resumed with another reward (or sets, model, sampling) evaluates the reference
    again instead of reusing eval/before.json, whose numbers were made under the old settings;
    the method and its hyperparameters do not matter to it."""
    from prdp_jax.experiments import findings, runner
    from prdp_jax.training import evaluation
    size = runner.SIZES["quick"]
    config = runner.run_config(size, "large", findings.Arm("PRDP", {"method": "prdp"}), 0, {})
    saved = {n: {"reward_mean": 0.5, "config_key": evaluation.config_key(config)}
             for n in config.eval.sets}
    assert evaluation.reusable(saved, config)
    other_method = runner.run_config(size, "large", findings.Arm("DDPO", findings.ddpo()), 1, {})
    assert evaluation.reusable(saved, other_method)
    quality = runner.run_config(size, "large", findings.Arm("PRDP", {"method": "prdp"}), 0, {},
                                reward={"quality": 1.0, "alignment": 0.0})
    assert not evaluation.reusable(saved, quality)
    fewer = runner.run_config(size, "large", findings.Arm("PRDP", {"method": "prdp"}), 0, {})
    fewer.eval.sets = config.eval.sets[:1]
    assert not evaluation.reusable(saved, fewer)
    unstamped = {n: {"reward_mean": 0.5} for n in config.eval.sets}   # written before the key
    assert not evaluation.reusable(unstamped, config)


def test_the_base_check_leaves_the_runs_config_as_asked(tmp_path, monkeypatch):
    """Checking the base (runner.reference) builds the pipeline, which resolves the base folder
    into the config it is given; the run that follows must still record `model.path` as asked
    (empty: the shipped base), or its record would never match its config again."""
    from prdp_jax.experiments import findings, runner
    from prdp_jax.pipelines import factory

    class Built(Exception):
        pass

    def build(config, mesh, log=print):
        config.model.path = "/resolved/base_model"   # what the world's pipeline does
        raise Built
    monkeypatch.setattr(factory, "build_pipeline", build)
    config = runner.run_config(runner.SIZES["quick"], "large_k",
                               findings.Arm("PRDP", findings.prdp()), 0, {})
    asked = runner.to_json(config)
    with pytest.raises(Built):
        runner.reference(config, str(tmp_path))
    assert runner.to_json(config) == asked and not config.model.path


def test_the_findings_clip_is_the_committed_calibration_and_every_clipped_arm_uses_it():
    from prdp_jax.experiments import findings
    with open(os.path.join(ROOT, "docs", "results", "clip_calibration.json")) as f:
        calibration = json.load(f)
    assert findings.CLIP == findings.clip_rule(calibration["quantiles"]["50"]) == \
        calibration["clip"]
    for f in findings.FINDINGS.values():
        for arm in f.arms:
            o = arm.overrides
            clip = o["prdp.clip_eps"] if o["method"] == "prdp" else o["ddpo.clip_range"]
            assert clip == (findings.INF if "no clip" in arm.name else findings.CLIP), arm
