"""What every command shares on its command line: one `error:` line for bad flags or configs."""
from __future__ import annotations

import os
import re
import sys

from absl import flags

FLAGS = flags.FLAGS


def fail(message: str) -> None:
    """Prints `error: message` to stderr and exits 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_command(main, *args, **kwargs) -> None:
    """Runs a command's `main`; an exit 2 (an `error:` line was printed) leaves at once, without
    interpreter shutdown: after an Orbax or TensorStore error their background threads would
    print tracebacks while the process winds down. Every file a command writes is closed or
    atomic by then."""
    try:
        main(*args, **kwargs)
    except SystemExit as e:
        if e.code == 2:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        raise


def one_line(e: BaseException) -> str:
    """A readable single line from the exceptions that config parsing raises."""
    text = str(e.args[0] if isinstance(e, (KeyError, AttributeError)) and e.args else e)
    text = text.replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    return re.sub(r"\s+", " ", text).strip(" '\"")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`: every failure to read
    --config or an override becomes one `error:` line and exit 2."""
    from prdp_jax.infra.errors import UserError
    try:
        rest = FLAGS(argv)
    except UserError as e:
        fail(str(e))
    except SyntaxError as e:
        fail(f"config file {e.filename} line {e.lineno}: {e.msg}")
    except (NameError, ImportError) as e:
        fail(f"cannot load --config: {type(e).__name__}: {one_line(e)}")
    except flags.Error as e:
        fail(one_line(e))
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        fail(f"bad --config or override: {one_line(e)}")
    if FLAGS.config is None:
        fail("--config is required, e.g. --config configs/jpeg_tiny.py")
    try:
        FLAGS.config.keys()  # a config file that failed to load raises only when first used
    except OSError as e:
        last = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        fail(f"cannot load --config {FLAGS['config'].config_filename}: {last}")
    return rest
