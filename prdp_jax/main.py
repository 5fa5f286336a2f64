"""Command line entry point, intentionally kept short.

    python -m prdp_jax.main --config configs/<file>.py[:recipe] [--workdir DIR] [--config.a.b=v]

It parses the flags, sets up JAX (multi-host runtime, compilation cache) and calls
`training.loop.train_and_evaluate(config, workdir)`. Errors in user input print one line and exit 2; a run
stopped by SIGTERM checkpoints, says how far it got and exits 143; rerunning it resumes.
"""
from __future__ import annotations

import os
import signal
import sys

# SIGTERM counts from the first moment, before the heavy imports: recorded here until the
# trainer's StopSignal takes over (a run stopped before its first epoch exits 143 too).
_early_sigterm: list[int] = []
if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: _early_sigterm.append(signum))

from absl import app, flags, logging
from ml_collections import config_flags

from prdp_jax.infra.cli import fail, parse_flags, run_command

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally ':recipe'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and samples go here "
                    "(default: runs/<config name>[-<recipe>]).")


def default_workdir(config_arg: str) -> str:
    path, _, recipe = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}-{recipe}" if recipe else name)


def main(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # JAX's backend probing is INFO-level noise here.
    from prdp_jax.infra import runtime
    from prdp_jax.infra.errors import UserError
    from prdp_jax.training import preemption
    from prdp_jax.training.loop import train_and_evaluate
    stop = preemption.StopSignal(received=bool(_early_sigterm))  # SIGTERM: stop at a safe point
    try:
        runtime.setup(FLAGS.config)
        workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
        train_and_evaluate(FLAGS.config, workdir, stop=stop)
    except UserError as e:
        fail(str(e))
    except preemption.Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(preemption.EXIT_CODE)


if __name__ == "__main__":
    run_command(app.run, main, flags_parser=parse_flags)
