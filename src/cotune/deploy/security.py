"""How the gRPC ends authenticate: TLS (a server certificate, optionally mutual with a
certificate per node whose name is its id) and per-node tokens, stored on the server as their
SHA-256 (``token_hash``). ``cotune certs`` makes a test CA, certificates and tokens."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.errors import ConfigError


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Security:
    """How the ends authenticate: ``tls_dir`` holds ca.pem, server.pem/.key and (mutual TLS)
    <node>.pem/.key; ``tokens`` maps node id → SHA-256 of its token (server side)."""

    tls_dir: Path | None = None
    mutual: bool = False
    insecure: bool = False

    def check(self) -> None:
        if self.tls_dir is None and not self.insecure:
            raise ConfigError(
                "no TLS directory given: pass --tls DIR (make one with `cotune certs DIR`), or "
                "--insecure for plain text on a trusted network"
            )


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"TLS: cannot read the {what} {path}: {err.strerror}") from None


def server_credentials(grpc: Any, sec: Security) -> Any:
    assert sec.tls_dir is not None
    d = sec.tls_dir
    pair = (
        _read_file(d / "server.key", "server key"),
        _read_file(d / "server.pem", "server certificate"),
    )
    ca = _read_file(d / "ca.pem", "CA certificate") if sec.mutual else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=sec.mutual)


def client_credentials(grpc: Any, sec: Security, node: str) -> Any:
    assert sec.tls_dir is not None
    d = sec.tls_dir
    ca = _read_file(d / "ca.pem", "CA certificate")
    if not sec.mutual:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=_read_file(d / f"{node}.key", f"{node} key"),
        certificate_chain=_read_file(d / f"{node}.pem", f"{node} certificate"),
    )
