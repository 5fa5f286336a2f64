"""Every bad input and failure the trainer must survive, run as a user would run it.

Each case runs the real command line (`python -m prdp_jax.main` or `prdp_jax.export`) in a
subprocess on the tests' tiny config, after an optional preparation (a finished run, a corrupted
file, a 150 KB file-size limit standing in for a full disk), and checks what the user gets: the exit
status, the one `error:` line and what is left on disk. `tests/test_reliability.py` runs them; this
file, run as a script, writes the table of docs/reliability.md from the same runs, so the table
stays true:

    python tests/reliability.py --out docs/reliability.md
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
import tempfile
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "tests/configs/tiny.py"]


@dataclasses.dataclass
class Outcome:
    returncode: int
    stderr: str
    stdout: str
    workdir: str

    @property
    def error_lines(self) -> list[str]:
        return [l for l in self.stderr.splitlines() if l.startswith("error: ")]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str                     # what the user did (a row of the table)
    args: tuple[str, ...]         # flags after `python -m <module>`; {workdir} is substituted
    expect: str                   # a substring of the one error line ("" for a clean exit 0)
    module: str = "prdp_jax.main"
    prepare: Optional[Callable[[str], None]] = None   # (workdir) -> None, before the command
    check: Optional[Callable[[Outcome], None]] = None  # more assertions on the outcome
    file_limit: int = 0           # RLIMIT_FSIZE in bytes for the command (0: none)
    slow: bool = True             # in the suite's slow tier (the fast tier runs a few start-time
                                  # cases; test_reliability checks every config value in-process)


def run(case: Case, workdir: str, timeout: int = 600) -> Outcome:
    if case.prepare is not None:
        case.prepare(workdir)
    args = [a.replace("{workdir}", workdir) for a in case.args]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", case.module, *args]
    if case.file_limit:
        # The limit is set by the child itself before it runs the command (no preexec_fn: a
        # forked child of a multithreaded parent must not run Python before exec). A write past
        # it fails with EFBIG ("File too large") instead of killing the process.
        n = case.file_limit
        command = [sys.executable, "-c",
                   f"import resource, runpy, signal, sys; "
                   f"signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                   f"resource.setrlimit(resource.RLIMIT_FSIZE, ({n}, {n})); "
                   f"sys.argv = [{case.module!r}] + sys.argv[1:]; "
                   f"runpy.run_module({case.module!r}, run_name='__main__', alter_sys=True)", *args]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return Outcome(proc.returncode, proc.stderr, proc.stdout, workdir)


def verify(case: Case, out: Outcome) -> None:
    """The contract: exit 2 with exactly one `error:` line (or exit 0), no traceback."""
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    if case.expect:
        assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
        assert len(out.error_lines) == 1, out.stderr[-3000:]
        assert case.expect in out.error_lines[0], out.error_lines[0]
        assert len(out.error_lines[0]) < 600, out.error_lines[0]
    else:
        assert out.returncode == 0, out.stderr[-3000:]
    if case.check is not None:
        case.check(out)


# ---- preparations ------------------------------------------------------------------------------

def train(epochs: int, *extra: str) -> Callable[[str], None]:
    """A finished tiny run of `epochs` epochs in the workdir."""
    def prepare(workdir: str) -> None:
        subprocess.run([sys.executable, "-m", "prdp_jax.main", *TINY, "--workdir", workdir,
                        f"--config.train.epochs={epochs}", *extra], cwd=ROOT, check=True,
                       env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"),
                       capture_output=True, timeout=600)
    return prepare


def corrupt_latest(workdir: str) -> None:
    """Overwrites 4 KB in the middle of the largest array file of the latest checkpoint."""
    latest = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", str(latest), "state", "**"),
                                  recursive=True) if os.path.isfile(f) and "/d/" in f]
    target = max(files, key=os.path.getsize)
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
        f.seek(max(0, size // 2 - 2048))
        f.write(os.urandom(min(4096, size)))


def then(*steps: Callable[[str], None]) -> Callable[[str], None]:
    def prepare(workdir: str) -> None:
        for step in steps:
            step(workdir)
    return prepare


def write_prompts(lines: list[str]) -> Callable[[str], None]:
    def prepare(workdir: str) -> None:
        os.makedirs(os.path.dirname(workdir), exist_ok=True)
        with open(workdir + ".prompts.txt", "w") as f:
            f.write("\n".join(lines) + "\n")
    return prepare


def empty_checkpoints(workdir: str) -> None:
    train(1)(workdir)
    for step in os.listdir(os.path.join(workdir, "checkpoints")):
        import shutil
        shutil.rmtree(os.path.join(workdir, "checkpoints", step))


def kill_before_checkpoint(workdir: str) -> None:
    """A run killed (SIGKILL) after its first metrics row but before its checkpoint: simulated
    by a finished 1-epoch run whose checkpoint is then removed."""
    empty_checkpoints(workdir)


# ---- checks on what is left ---------------------------------------------------------------------

def no_workdir(out: Outcome) -> None:
    assert not os.path.exists(out.workdir), os.listdir(out.workdir)


def only_finite_checkpoints(out: Outcome) -> None:
    """Every checkpoint left holds only finite values (read back with Orbax)."""
    import numpy as np
    import orbax.checkpoint as ocp
    directory = os.path.join(out.workdir, "checkpoints")
    for step in (d for d in os.listdir(directory) if d.isdigit()):
        tree = ocp.StandardCheckpointer().restore(os.path.join(directory, step, "state"))
        import jax
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)), step


def strict_json_metrics(out: Outcome) -> None:
    path = os.path.join(out.workdir, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path):
            json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def full_disk_left_clean(out: Outcome) -> None:
    directory = os.path.join(out.workdir, "checkpoints")
    leftovers = [d for d in os.listdir(directory) if "tmp" in d] if os.path.isdir(directory) else []
    assert not leftovers, leftovers
    saved = {int(d) for d in os.listdir(directory) if d.isdigit()} if os.path.isdir(directory) else set()
    path = os.path.join(out.workdir, "metrics.jsonl")
    rows = [json.loads(l)["epoch"] for l in open(path)] if os.path.exists(path) else []
    assert all(r in saved or r < max(saved, default=0) for r in rows), (rows, saved)


def resumed_from_previous(out: Outcome) -> None:
    assert "falling back to checkpoint 1" in out.stderr + out.stdout
    assert os.path.isdir(os.path.join(out.workdir, "checkpoints_corrupt", "2"))
    rows = [json.loads(l)["epoch"] for l in open(os.path.join(out.workdir, "metrics.jsonl"))]
    assert rows == [1, 2, 3], rows


def each_epoch_once(out: Outcome) -> None:
    rows = [json.loads(l)["epoch"] for l in open(os.path.join(out.workdir, "metrics.jsonl"))]
    assert rows == [1, 2], rows
    events = glob.glob(os.path.join(out.workdir, "tensorboard", "events.out.tfevents.*"))
    steps = [s for e in events for s in event_steps(e, "loss")]
    assert sorted(steps) == [1, 2], steps


def event_steps(path: str, tag: str) -> list[int]:
    """Steps of `tag`'s scalars in a TensorBoard event file (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2
    steps = []
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i + 12 <= len(data):
        n = int.from_bytes(data[i:i + 8], "little")
        event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


LONG_PROMPT = "a photo of a cat " * 6000   # ~100 KB
CASES = [
    Case("learning rate 1e10 (NaN loss in epoch 1)",
         (*TINY, "--workdir", "{workdir}", "--config.train.learning_rate=1e10"),
         "is not finite", check=no_workdir),
    Case("learning rate 1e10 after a good epoch (resumed run)",
         (*TINY, "--workdir", "{workdir}", "--config.train.epochs=2",
          "--config.train.learning_rate=1e10"),
         "the last good checkpoint, epoch 1, is kept",
         prepare=train(1), check=lambda o: (only_finite_checkpoints(o), strict_json_metrics(o)),
         slow=True),
    Case("train.learning_rate=nan", (*TINY, "--workdir", "{workdir}", "--config.train.learning_rate=nan"),
         "train.learning_rate must be a finite number >= 0", check=no_workdir, slow=False),
    Case("train.learning_rate=inf", (*TINY, "--workdir", "{workdir}", "--config.train.learning_rate=inf"),
         "train.learning_rate must be a finite number >= 0"),
    Case("train.learning_rate=-1e-4", (*TINY, "--workdir", "{workdir}",
                                       "--config.train.learning_rate=-1e-4"),
         "train.learning_rate must be a finite number >= 0"),
    Case("prdp.beta=nan", (*TINY, "--workdir", "{workdir}", "--config.prdp.beta=nan"),
         "prdp.beta must be a finite number > 0"),
    Case("reward weight 1e999", (*TINY, "--workdir", "{workdir}",
                                 '--config.reward.weights={"jpeg_compressibility": 1e999}'),
         "reward.weights.jpeg_compressibility must be a finite number"),
    Case("checkpoint.max_to_keep=0", (*TINY, "--workdir", "{workdir}",
                                      "--config.checkpoint.max_to_keep=0"),
         "checkpoint.max_to_keep must be >= 1"),
    Case("sample.guidance_scale=-1", (*TINY, "--workdir", "{workdir}",
                                      "--config.sample.guidance_scale=-1"),
         "sample.guidance_scale must be a finite number >= 0"),
    Case("a config file with a syntax error", ("--config", "{workdir}.bad_config.py"),
         "line 1: invalid syntax",
         prepare=lambda w: (os.makedirs(os.path.dirname(w), exist_ok=True),
                            open(w + ".bad_config.py", "w").write("def get_config(:\n")),
         slow=False),
    Case("a prompt file with an emoji-only prompt",
         (*TINY, "--workdir", "{workdir}", "--config.prompts.train=file:{workdir}.prompts.txt"),
         "has no word the tokenizer knows",
         prepare=write_prompts(["a cat", "a dog", "\U0001F431\U0001F436", "a bird"]),
         check=no_workdir, slow=False),
    Case("a prompt file with a 100 KB prompt",
         (*TINY, "--workdir", "{workdir}", "--config.prompts.train=file:{workdir}.prompts.txt"),
         "prompt 3", prepare=write_prompts(["a cat", "a dog", LONG_PROMPT, "a bird"])),
    Case("a corrupted latest checkpoint, resumed",
         (*TINY, "--workdir", "{workdir}", "--config.train.epochs=3"),
         "is corrupted", prepare=then(train(2), corrupt_latest)),
    Case("a corrupted latest checkpoint, resumed with checkpoint.fallback=previous",
         (*TINY, "--workdir", "{workdir}", "--config.train.epochs=3",
          "--config.checkpoint.fallback=previous"),
         "", prepare=then(train(2), corrupt_latest), check=resumed_from_previous),
    Case("a corrupted checkpoint, exported",
         ("--workdir", "{workdir}", "--out", "{workdir}.export"), "is corrupted",
         module="prdp_jax.export", prepare=then(train(1), corrupt_latest)),
    Case("export of a workdir whose checkpoints/ is empty",
         ("--workdir", "{workdir}", "--out", "{workdir}.export"), "holds no checkpoint",
         module="prdp_jax.export", prepare=empty_checkpoints),
    Case("a restart that finds metrics but no checkpoint",
         (*TINY, "--workdir", "{workdir}"), "", prepare=kill_before_checkpoint,
         check=each_epoch_once),
    Case("a full disk (writes past 150 KB fail)", (*TINY, "--workdir", "{workdir}"),
         "cannot write checkpoint 1", file_limit=150_000, check=full_disk_left_clean),
]


def write_table(path: str) -> None:
    rows = ["| case | exit | what the user gets |", "|---|---|---|"]
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            out = run(case, os.path.join(tmp, "run"))
            verify(case, out)
            warnings = [l for l in (out.stderr + out.stdout).splitlines()
                        if l.startswith("warning: ")]
            line = (out.error_lines or warnings or ["(runs to the end)"])[0]
            line = line.replace(tmp, "DIR").replace("|", "\\|")
            rows.append(f"| {case.name} | {out.returncode} | `{line}` |")
            print(rows[-1], flush=True)
    with open(path) as f:
        text = f.read()
    begin, end = "<!-- table: begin -->", "<!-- table: end -->"
    head, tail = text.split(begin)[0], text.split(end)[1]
    with open(path, "w") as f:
        f.write(head + begin + "\n" + "\n".join(rows) + "\n" + end + tail)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "reliability.md"))
    write_table(parser.parse_args().out)
