"""``lightning-fed``: one command for every job.

    lightning-fed fit --config recipes/hospitals.yaml          # LightningCLI (also validate, test)
    lightning-fed compare --config RECIPE --modes pooled,local,federated --repeats N
    lightning-fed sweep --config RECIPE --grid KEY=V1,V2

``fit``/``validate``/``test`` are :class:`~lightning_fed.lightning_cli.FederatedCLI` (everything LightningCLI
offers); ``compare``/``sweep`` are :mod:`lightning_fed.experiments`.
"""

from __future__ import annotations

import sys
from typing import Optional

EPILOG = ("Experiments: `lightning-fed compare --config RECIPE --modes pooled,local,federated --repeats N` and "
          "`lightning-fed sweep --config RECIPE --grid KEY=V1,V2`; `lightning-fed compare --help` for details.")


def main(args: Optional[list[str]] = None) -> None:
    """``lightning-fed fit|validate|test ...`` (LightningCLI) and ``lightning-fed compare|sweep ...`` (experiments)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ("compare", "sweep"):
        from lightning_fed.experiments import COMMANDS

        COMMANDS[argv[0]](argv[1:])
        return
    from lightning_fed.lightning_cli import FederatedCLI

    FederatedCLI(args=args, save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "lightning-fed", "epilog": EPILOG})


if __name__ == "__main__":
    main()
