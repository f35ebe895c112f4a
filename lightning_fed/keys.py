"""``lightning-fed keys``: per-site identity keys for secure aggregation.

    lightning-fed keys --sites hospital_a,hospital_b,hospital_c --out keys/

writes ``<site>.key`` (Ed25519 private key, mode 0600) and ``<site>.pub`` for every site. Each hospital keeps its
own ``.key`` and nothing else private; every hospital gets every ``.pub``; the coordinator needs neither. Point the
federation at the folder with ``secagg_kwargs={"identity_dir": "keys/"}`` (the folder each site reads on its own
machine). Sites then sign every round's key-agreement keys, and a key the coordinator altered is refused.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from lightning_fed.strategies.masking import write_identities


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-fed keys",
        description=__doc__.split("\n\n")[0].strip("`: "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sites", required=True, help="comma-separated site names, as the recipe names them")
    parser.add_argument(
        "--out", required=True, help="folder to write <site>.key and <site>.pub into (created if missing)"
    )
    args = parser.parse_args(argv)
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    if not sites or len(set(sites)) != len(sites):
        parser.error(f"--sites needs distinct site names, got {args.sites!r}")
    try:
        folder = write_identities(sites, args.out)
    except FileExistsError as err:
        parser.error(str(err))
    print(
        f"identity keys for {len(sites)} sites written to {folder}: give each site its own <site>.key (and no other), "
        "every site every <site>.pub, and run with secagg_kwargs={'identity_dir': '<that folder on each machine>'}"
    )
