"""``lightning-fed``: one command for every job.

    lightning-fed fit --config recipes/hospitals.yaml          # LightningCLI (also validate, test)
    lightning-fed compare --config RECIPE --modes pooled,local,federated --repeats N
    lightning-fed sweep --config RECIPE --grid KEY=V1,V2
    lightning-fed inventory --config RECIPE                    # exams per site by vendor, model, kernel
    lightning-fed replot runs/compare/FOLDER                   # redraw a compare's or sweep's figures
    lightning-fed keys --sites a,b,c --out keys/               # per-site identity keys for secure aggregation
    lightning-fed certs --out certs/ --node head=10.0.0.1 ...  # TLS certificates for the Ray links

``fit``/``validate``/``test`` are :class:`~lightning_fed.lightning_cli.FederatedCLI` (everything LightningCLI
offers); ``compare``/``sweep`` are :mod:`lightning_fed.experiments`, ``inventory`` is :mod:`lightning_fed.inventory`.
"""

from __future__ import annotations

import gc
import os
import sys
from importlib import import_module
from typing import Optional

from lightning_fed.errors import TRACEBACK_ENV, RunFailedError, explain, run_failure

EPILOG = (
    "Experiments: `lightning-fed compare --config RECIPE --modes pooled,local,federated --repeats N` and "
    "`lightning-fed sweep --config RECIPE --grid KEY=V1,V2`; `lightning-fed compare --help` for details. "
    "Exams per site by vendor, model and kernel: `lightning-fed inventory --config RECIPE`."
)


def main(args: Optional[list[str]] = None) -> None:
    """``lightning-fed fit|validate|test ...`` (LightningCLI) and ``lightning-fed compare|sweep ...`` (experiments).

    An error the user can fix ends the command with one line, ``lightning-fed: error: <what> (<how to fix>)``, and
    exit status 2 (a recipe or flag). A run that fails once started (a site raised, a site's worker or the
    coordinator died) ends with one line naming what failed and the round to resume from, and exit status 1.
    ``--traceback`` or ``LIGHTNING_FED_TRACEBACK=1`` shows the full trace instead."""
    argv = list(sys.argv[1:] if args is None else args)
    show_trace = "--traceback" in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--traceback"]
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads the command line itself (and warns when given both)
    command = argv[0] if argv and not argv[0].startswith("-") else "fit"
    try:
        _run(argv, from_command_line=args is None)
        if args is None:
            _before_exit()
    except KeyboardInterrupt:
        print("lightning-fed: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit as done:
        if isinstance(done.code, str):  # a message from code that exits by itself
            print(f"lightning-fed: error: {done.code.removeprefix('lightning-fed: ')}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except Exception as err:
        if show_trace:
            raise
        failed = isinstance(err, RunFailedError)  # not the user's input: no pointer to --help, where to resume instead
        print(f"lightning-fed: error: {run_failure(err) if failed else explain(err, command)}", file=sys.stderr)
        raise SystemExit(1 if failed else 2) from None


def _before_exit() -> None:
    """The command is done and its process ends next (Ray stops in the exit handlers): keep Python's last garbage
    collections from walking every object torch and Lightning made on import. They took about 1.2 s of the exit on
    the 2-core machine (0.2 s frozen). Exit handlers still run, and objects freed by reference counting still
    finalise; only cycles left at exit go to the operating system uncollected, as the process's memory does."""
    gc.freeze()


def _run(argv: list[str], from_command_line: bool) -> None:
    # the Trainer's strategy flags, for a job's recipe (the package leaves this import to the command when it
    # started Ray early: lightning_fed.__init__)
    import_module("lightning_fed.strategy")
    if argv and argv[0] in ("compare", "sweep", "replot"):
        from lightning_fed.experiments import COMMANDS

        COMMANDS[argv[0]](argv[1:])
        return
    if argv and argv[0] in ("keys", "certs"):
        from lightning_fed.keys import main as keys
        from lightning_fed.tls import main as certs

        {"keys": keys, "certs": certs}[argv[0]](argv[1:])
        return
    if argv and argv[0] == "inventory":
        from lightning_fed.inventory import main as inventory

        inventory(argv[1:])
        return
    from lightning_fed.lightning_cli import FederatedCLI

    FederatedCLI(
        args=None if from_command_line else argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lightning-fed", "epilog": EPILOG, "exit_on_error": False},
    )


if __name__ == "__main__":
    main()
