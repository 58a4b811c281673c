"""TLS and mutual TLS for the gRPC server and for streamscore's own clients.

Server: a certificate chain and key turn TLS on; a client CA file on top turns on
mutual TLS, where a client must present a certificate signed by that CA or the
handshake fails (the call never reaches a handler). Clients (the CLI, the health
check, the demo): a CA file to trust the server, and a certificate and key when the
server asks for one. Files are read once, at start; a wrong combination or an
unreadable file is a clear error then, not a handshake failure later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["ClientTls", "TlsError", "server_credentials"]


class TlsError(ValueError):
    """A TLS setting that cannot work: a missing file, a certificate without its key."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as error:
        raise TlsError(f"cannot read the {what} {path!r}: {error.strerror}") from None
    if b"-----BEGIN" not in data:
        raise TlsError(f"the {what} {path!r} is not PEM")
    return data


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str = ""
) -> grpc.ServerCredentials | None:
    """Credentials for ``add_secure_port``, or None when TLS is off (no cert, no key)."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise TlsError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return None
    if not (cert_file and key_file):
        raise TlsError("TLS needs both tls_cert_file and tls_key_file")
    pair = (_read(key_file, "TLS key"), _read(cert_file, "TLS certificate"))
    if client_ca_file:
        return grpc.ssl_server_credentials(
            [pair],
            root_certificates=_read(client_ca_file, "client CA"),
            require_client_auth=True,
        )
    return grpc.ssl_server_credentials([pair])


@dataclass(frozen=True)
class ClientTls:
    """How a streamscore client reaches the server: plaintext unless a CA is given."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # Name to check the server certificate against, when it differs from the target
    # host (e.g. connecting by IP to a certificate issued for a DNS name).
    server_name: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file)

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert_file) != bool(self.key_file):
            raise TlsError("a client certificate needs its key (and the key its certificate)")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA") if self.ca_file else None,
            private_key=_read(self.key_file, "client key") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "client certificate")
            if self.cert_file
            else None,
        )

    def _options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def channel(self, target: str) -> grpc.Channel:
        if not self.enabled:
            return grpc.insecure_channel(target)
        return grpc.secure_channel(target, self.credentials(), options=self._options())

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        if not self.enabled:
            return grpc.aio.insecure_channel(target)
        return grpc.aio.secure_channel(target, self.credentials(), options=self._options())
