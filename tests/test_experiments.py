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
        assert isinstance(result["held"], bool) and result["measured"] and result["rule"]
        for arm in result["arms"].values():
            curve = arm["curves"][0]
            assert curve["eval"]["world_heldout"]["queries"][0] == 0  # the base model first
            assert len(curve["train_reward"]) == 2
    assert (out / "beta_tradeoff.png").stat().st_size > 0
    # One reference evaluation, shared by every run: each curve starts at its numbers.
    (shared,) = (runs / "before").iterdir()
    base = json.loads(shared.read_text())["world_heldout"]["reward_mean"]
    for name in FINDINGS:
        for arm in json.loads((out / f"{name}.json").read_text())["arms"].values():
            assert arm["curves"][0]["eval"]["world_heldout"]["reward"][0] == base
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
    for name, held in (("beta", False), ("small_scale", True)):
        (out / f"{name}.json").write_text(json.dumps(
            {"finding": f"title {name}", "paper": "p", "measured": f"m {name}", "rule": "r",
             "held": held}))
    report.update_page(str(page), str(out), FINDINGS)
    text = page.read_text()
    assert text.startswith("# Results\n\nIntro.\n\n") and text.endswith("\n\nNotes.\n")
    assert "old table" not in text and "large_scale" not in text
    rows = [line for line in text.splitlines() if line.startswith("| title")]
    assert rows == ["| title small_scale | p | m small_scale | r | yes |",
                    "| title beta | p | m beta | r | no |"]  # in the findings' order


def test_a_recorded_run_is_read_back_only_while_its_config_matches(tmp_path, monkeypatch):
    from prdp_jax.experiments import findings, runner
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
            f.write(json.dumps({"epoch": 1, "reward_mean": 0.7, "drift": 0.02}) + "\n")
        before = {n: {"reward_mean": 0.1, "reward_se": 0.01} for n in config.eval.sets}
        with open(os.path.join(workdir, "eval", "before.json"), "w") as f:
            json.dump(before, f)
    monkeypatch.setattr(train, "train_and_evaluate", fake_training)
    config.seed = 1  # another run: the record no longer applies
    out = runner.run(config, str(tmp_path / "run"), record=str(record))
    assert trained and out["train_reward"] == [0.7]
    assert out["eval"]["world_heldout"]["reward"] == [0.1]
    assert json.loads(record.read_text()) == {"config": json.loads(runner.to_json(config)),
                                              "curve": out}


def test_an_arm_set_to_a_config_default_shares_the_plain_arms_runs():
    from prdp_jax.experiments import findings, runner
    size = runner.SIZES["full"]
    beta = runner.world_config(size.recipe).prdp.beta
    low, same, high = findings.beta_arms(beta)
    plain = findings.Arm("PRDP", {"method": "prdp"})
    assert runner.arm_key(size, same) == runner.arm_key(size, plain) == "method=prdp"
    assert runner.arm_key(size, low) == f"method=prdp,prdp.beta={beta * 0.1}"
    assert runner.arm_key(size, high) != runner.arm_key(size, plain)


def _curve(base, final):
    return {"eval": {n: {"reward": [base, final], "drift": [0.0, 0.01]}
                     for n in ("world_small", "world_large_sample", "world_heldout")}}


def test_base_spread_names_only_the_sets_whose_runs_start_apart():
    from prdp_jax.experiments import report
    same = [_curve(0.2, 0.3), _curve(0.2, 0.25)]
    assert report.base_spread(same) == {}
    apart = same + [{"eval": {**_curve(0.2, 0.3)["eval"],
                              "world_heldout": {"reward": [0.1868, 0.2], "drift": [0, 0]}}}]
    assert report.base_spread(apart) == {"world_heldout": [0.1868, 0.2]}


def test_clipping_holds_only_where_removing_the_clip_costs_reward_at_both_scales():
    from prdp_jax.experiments import report

    def arms(clipped, unclipped):
        s = {}
        for scale in ("small", "large"):
            s[(scale, "PRDP")] = report.summarise([_curve(0.2, v) for v in clipped])
            s[(scale, "PRDP, no clip")] = report.summarise([_curve(0.2, v) for v in unclipped])
            s[(scale, "DDPO")] = s[(scale, "DDPO, no clip")] = s[(scale, "PRDP")]
        return s
    assert report.verdict("clipping", arms([0.30, 0.31, 0.32], [0.20, 0.21, 0.22]))[0]
    # a clip that never binds: the two arms end level, so the paper's "the clip is needed" fails
    assert not report.verdict("clipping", arms([0.30, 0.31, 0.32], [0.30, 0.31, 0.32]))[0]
    assert not report.verdict("clipping", arms([0.30, 0.31, 0.32], [0.40, 0.41, 0.42]))[0]


def test_new_runs_from_a_different_base_are_refused_before_training(tmp_path, monkeypatch):
    from prdp_jax.experiments import __main__ as ex_main, findings, runner
    from prdp_jax.infra.errors import UserError
    from prdp_jax.training import loop as train
    size = runner.SIZES["quick"]
    ex = ex_main.Experiments(size, str(tmp_path / "results"), str(tmp_path / "runs"), quick=True,
                             log=lambda *a: None)
    arm = findings.Arm("PRDP", {"method": "prdp"})
    config = runner.run_config(size, "small", arm, 0, {}, ex.base_dir)
    record = tmp_path / "results" / "runs" / "small" / "prdp" / "method=prdp" / "seed0.json"
    record.parent.mkdir(parents=True)
    made_elsewhere = {"queries": [0], "train_reward": [], "drift": [],
                      "eval": {n: {"reward": [0.1876], "se": [0.0], "drift": [0.0],
                                   "queries": [0]} for n in runner.EVAL_SETS}}
    record.write_text(json.dumps({"config": json.loads(runner.to_json(config)),
                                  "curve": made_elsewhere}))
    assert runner.recorded_base(str(tmp_path / "results" / "runs"), config)["world_heldout"] == 0.1876
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("trained from a base that differs from the records'")))
    here = {n: {"reward_mean": 0.1868} for n in runner.EVAL_SETS}
    monkeypatch.setattr(runner, "reference", lambda *a, **k: here)
    # seed 0 is recorded: read back, no check; seed 1 would be new, from another base: refused
    assert ex.run_arm("small", arm, {}, seeds=1)[0] == made_elsewhere
    with pytest.raises(UserError, match=r"world_\w+: 0\.1868 here, 0\.1876 there"):
        ex.run_arm("small", arm, {}, seeds=2)
    # the same base: the check passes and training goes ahead
    here.update({n: {"reward_mean": 0.1876} for n in runner.EVAL_SETS})
    with pytest.raises(AssertionError, match="trained from a base"):
        ex.run_arm("small", arm, {}, seeds=2)
