"""``lightning-fed certs``: certificates for Ray's TLS links between hospitals, and the environment each node needs.

    lightning-fed certs --out certs/ --node head=10.0.0.1 --node hospital_a=10.1.0.7 --node driver=10.0.0.1

writes a private certificate authority (``ca.crt``; its key ``ca.key`` stays with whoever runs this) and one key and
certificate per node (``<node>.key``, ``<node>.crt``; the node's addresses, ``localhost`` and ``127.0.0.1`` as
subject alternative names). Every Ray process (each node's ``ray start``, the driver, ``ray job submit``) then
runs with::

    RAY_USE_TLS=1  RAY_TLS_SERVER_CERT=<node>.crt  RAY_TLS_SERVER_KEY=<node>.key  RAY_TLS_CA_CERT=ca.crt

so every gRPC link between nodes is encrypted and both ends must present a certificate of the federation's CA
(mutual TLS), and with token authentication on top::

    RAY_AUTH_MODE=token  RAY_AUTH_TOKEN_PATH=<a file holding the cluster's token>   (ray get-auth-token --generate)

``lightning-fed certs --env NODE --out certs/`` prints the ``export`` lines for one node.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _write_private(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


def _subject_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", *hosts]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in names:
            names.append(entry)
    return x509.SubjectAlternativeName(names)


def write_certificates(folder: str | os.PathLike, nodes: dict[str, Sequence[str]], days: int = 365) -> Path:
    """A CA and one certificate per node (``{node: [its IP addresses or host names]}``); never overwrites."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    taken = [p for p in [folder / "ca.crt", *(folder / f"{n}.crt" for n in nodes)] if p.exists()]
    if taken:
        raise FileExistsError(f"{taken[0]} exists already: write the certificates into a new folder")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lightning-fed federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(ca_key, folder / "ca.key")
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for node, hosts in nodes.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(_subject_names(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(key, folder / f"{node}.key")
        (folder / f"{node}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder


def ray_tls_env(folder: str | os.PathLike, node: str) -> dict[str, str]:
    """The environment a Ray process of ``node`` needs for mutual TLS with the federation's CA."""
    folder = Path(folder).resolve()
    missing = [p for p in (folder / "ca.crt", folder / f"{node}.crt", folder / f"{node}.key") if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]} not found: write the node's certificate with lightning-fed certs --node {node}=ADDRESS"
        )
    return {
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": str(folder / f"{node}.crt"),
        "RAY_TLS_SERVER_KEY": str(folder / f"{node}.key"),
        "RAY_TLS_CA_CERT": str(folder / "ca.crt"),
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-fed certs", description="Certificates for Ray's TLS links between hospitals."
    )
    parser.add_argument("--out", required=True, help="folder for ca.crt, ca.key and <node>.crt/.key")
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NAME=ADDRESS[,ADDRESS...]",
        help="a node and the addresses it is reached at (repeat for every node, the driver's included)",
    )
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates")
    parser.add_argument("--env", metavar="NAME", help="print the export lines for node NAME from --out instead")
    args = parser.parse_args(argv)
    if args.env:
        try:
            env = ray_tls_env(args.out, args.env)
        except FileNotFoundError as err:
            parser.error(str(err))
        print("\n".join(f"export {k}={v}" for k, v in env.items()))
        return
    nodes = {}
    for spec in args.node:
        name, _, hosts = spec.partition("=")
        if not name or not hosts:
            parser.error(f"--node {spec!r}: give NAME=ADDRESS[,ADDRESS...], e.g. --node hospital_a=10.1.0.7")
        nodes[name] = [h.strip() for h in hosts.split(",") if h.strip()]
    if not nodes:
        parser.error("give at least one --node NAME=ADDRESS (every Ray node, and the driver's machine)")
    try:
        folder = write_certificates(args.out, nodes, args.days)
    except FileExistsError as err:
        parser.error(str(err))
    print(
        f"CA and certificates for {', '.join(nodes)} written to {folder}; keep ca.key offline, give each node its "
        f"<node>.crt, <node>.key and ca.crt; `lightning-fed certs --env NODE --out {folder}` prints its environment"
    )
