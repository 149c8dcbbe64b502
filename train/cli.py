"""What every ``python -m train...`` command shares: the recipe arguments, the simulated CPU
devices, and one ``error: ...`` line with exit code 2 for a mistake in the user's input."""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
from collections.abc import Iterator


def recipe_parser(
    prog: str,
    description: str,
    *,
    workdir_help: str,
    workdir_required: bool = False,
    resume_help: str | None = None,
) -> argparse.ArgumentParser:
    """A parser with ``--config FILE``, ``key=value`` overrides and ``--workdir DIR``; with
    ``resume_help``, also ``--resume`` (see :func:`overrides`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=pathlib.Path, help="a YAML recipe (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. run.steps=100")
    parser.add_argument(
        "--workdir", type=pathlib.Path, required=workdir_required, help=workdir_help
    )
    if resume_help is not None:
        parser.add_argument("--resume", action="store_true", help=resume_help)
    return parser


def overrides(args: argparse.Namespace) -> list[str]:
    """The command line's overrides, with ``checkpoint.resume=require`` for ``--resume``."""
    extra = ["checkpoint.resume=require"] if getattr(args, "resume", False) else []
    return [*args.overrides, *extra]


def default_workdir(config: pathlib.Path | None, *parts: str) -> pathlib.Path:
    """``runs/<recipe name>/<parts...>`` (``default`` without a recipe)."""
    return pathlib.Path("runs", config.stem if config else "default", *parts)


def use_simulated_cpu_devices(count: int = 8) -> None:
    """Gives the CPU backend ``count`` devices (harmless where an accelerator is the default).

    Must run before JAX starts a backend; respects a device count the user set.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    import jax

    jax.config.update("jax_num_cpu_devices", count)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns a ``ConfigError`` or ``CheckpointError`` into ``error: ...`` on stderr and exit
    code 2: a mistake in the input is one line naming what is wrong, not a traceback.

    ``train.checkpoint`` (which imports JAX and orbax) is not imported for this: where it was
    never imported, no ``CheckpointError`` can have been raised, and a config mistake is
    reported before JAX loads.
    """
    from train.config import ConfigError

    try:
        yield
    except Exception as err:
        checkpoint = sys.modules.get("train.checkpoint")
        if not isinstance(err, ConfigError) and not (
            checkpoint is not None and isinstance(err, checkpoint.CheckpointError)
        ):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
