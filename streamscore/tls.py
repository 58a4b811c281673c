"""TLS and mutual TLS for the gRPC server and for streamscore's own clients.

Server: a certificate chain and key turn TLS on; a client CA file on top turns on
mutual TLS, where a client must present a certificate signed by that CA or the
handshake fails (the call never reaches a handler). Clients (the CLI, the health
check): a CA file to trust the server, and a certificate and key when the server asks
for one (the demo's own clients are plaintext: it refuses TLS settings). Files are
read once, at start; a wrong combination, an unreadable file, a key that does not
fit its certificate or an expired certificate is a clear error then, naming the file,
not a handshake failure later (gRPC core would only say that it failed to bind, and
log the cause as a plain-text line outside the JSON log).
"""

from __future__ import annotations

import _ssl
import argparse
import datetime
import logging
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "ClientTls",
    "TlsError",
    "add_client_tls_arguments",
    "check_server_files",
    "refuse_passphrase",
    "server_credentials",
]

log = logging.getLogger("streamscore.tls")

# A server certificate that expires sooner than this is served, with a warning: it
# must be renewed (and the server restarted) before clients start refusing it.
EXPIRY_WARNING = datetime.timedelta(days=7)


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


def check_server_files(
    cert_file: str, key_file: str, client_ca_file: str = "", *, warn_expiry: bool = True
) -> None:
    """Refuse server TLS settings that cannot serve, naming the file and the reason;
    warn of a certificate about to expire (``warn_expiry``: a process that serves
    nothing itself, ``serve --workers``, checks before it starts any and leaves the
    warning to the workers, each of which serves the certificate)."""
    if not cert_file and not key_file:
        if client_ca_file:
            raise TlsError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return
    if not (cert_file and key_file):
        raise TlsError("TLS needs both tls_cert_file and tls_key_file")
    _check_pair(cert_file, key_file)
    _check_expiry(cert_file, warn=warn_expiry)
    if client_ca_file:
        _check_client_ca(client_ca_file)


def _check_pair(cert_file: str, key_file: str) -> None:
    """The certificate and key load together, as OpenSSL (gRPC's too) loads them."""
    cert, key = _read(cert_file, "TLS certificate"), _read(key_file, "TLS key")
    if _is_key_only(cert) and b"CERTIFICATE" in key and b"PRIVATE KEY" not in key:
        raise TlsError(
            f"tls_cert_file {cert_file!r} holds a private key and tls_key_file {key_file!r} "
            "a certificate: swapped?"
        )
    _validity(cert_file)  # a certificate at all
    if b"PRIVATE KEY" not in key:
        raise TlsError(f"the TLS key {key_file!r} is not a PEM private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(
            _local(cert_file), _local(key_file), password=refuse_passphrase(key_file)
        )
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"the TLS key {key_file!r} does not match the certificate {cert_file!r}"
            ) from None
        raise TlsError(
            f"the TLS key {key_file!r} holds no usable private key ({error.reason or error})"
        ) from None


def _local(path: str) -> str:
    """The path as ``_read`` opens it (``ssl`` does not expand ``~``)."""
    return str(Path(path).expanduser())


def _is_key_only(pem: bytes) -> bool:
    return b"PRIVATE KEY" in pem and b"CERTIFICATE" not in pem


def refuse_passphrase(key_file: str) -> Callable[[], str]:
    """For ``load_cert_chain(password=...)``: OpenSSL asks for an encrypted key's
    passphrase on the terminal unless a callback answers; this one refuses, with a
    TlsError naming the file (gRPC cannot take a passphrase either)."""

    def refuse() -> str:
        raise TlsError(f"the TLS key {key_file!r} is encrypted: give it without a passphrase")

    return refuse


def _validity(cert_file: str) -> tuple[datetime.datetime, datetime.datetime]:
    """When the first certificate in ``cert_file`` (the server's own) becomes valid
    and expires. ``_test_decode_cert`` is the standard library's own certificate parser
    (the ``ssl`` tests use it); the public ``cryptography`` would be a dependency for
    this alone."""
    try:
        decoded = _ssl._test_decode_cert(_local(cert_file))  # type: ignore[attr-defined]
    except ssl.SSLError:
        raise TlsError(f"the TLS certificate {cert_file!r} is not a PEM certificate") from None
    not_before, not_after = (
        datetime.datetime.fromtimestamp(ssl.cert_time_to_seconds(decoded[name]), datetime.UTC)
        for name in ("notBefore", "notAfter")
    )
    return not_before, not_after


def _check_expiry(cert_file: str, *, warn: bool) -> None:
    """A certificate not yet valid or expired is refused by every client (the health
    check too): refuse to start; one about to expire, a warning."""
    not_before, not_after = _validity(cert_file)
    now = datetime.datetime.now(datetime.UTC)
    if not_before > now:
        since = not_before.strftime("%Y-%m-%d %H:%M:%S UTC")
        raise TlsError(
            f"the TLS certificate {cert_file!r} is not valid before {since} "
            "(a certificate issued ahead, or this machine's clock is wrong)"
        )
    left = not_after - now
    when = not_after.strftime("%Y-%m-%d %H:%M:%S UTC")
    if left <= datetime.timedelta(0):
        raise TlsError(f"the TLS certificate {cert_file!r} expired on {when}")
    if warn and left < EXPIRY_WARNING:
        log.warning(
            "the TLS certificate expires soon: renew it, then restart",
            extra={"file": cert_file, "not_after": when},
        )


def _check_client_ca(ca_file: str) -> None:
    """gRPC core would take a file without a certificate, then fail to bind."""
    _read(ca_file, "client CA")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=_local(ca_file))
    except ssl.SSLError as error:
        if error.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            raise TlsError(f"the client CA file {ca_file!r} holds no certificate") from None
        raise TlsError(
            f"the client CA file {ca_file!r} holds no usable certificate ({error.reason or error})"
        ) from None
    if not context.cert_store_stats()["x509"]:  # a CRL only
        raise TlsError(f"the client CA file {ca_file!r} holds no certificate")


def server_credentials(
    cert_file: str, key_file: str, client_ca_file: str = ""
) -> grpc.ServerCredentials | None:
    """Credentials for ``add_secure_port``, or None when TLS is off (no cert, no key)."""
    check_server_files(cert_file, key_file, client_ca_file)
    if not cert_file:
        return None
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

    def aio_channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        if not self.enabled:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(
            target, self.credentials(), options=[*options, *self._options()]
        )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> ClientTls:
        """From ``STREAMSCORE_TLS_CA`` (TLS on), ``STREAMSCORE_TLS_CLIENT_CERT`` and
        ``_KEY`` (mutual TLS) and ``STREAMSCORE_TLS_SERVER_NAME``."""
        return cls(
            ca_file=environ.get("STREAMSCORE_TLS_CA", ""),
            cert_file=environ.get("STREAMSCORE_TLS_CLIENT_CERT", ""),
            key_file=environ.get("STREAMSCORE_TLS_CLIENT_KEY", ""),
            server_name=environ.get("STREAMSCORE_TLS_SERVER_NAME", ""),
        )

    @classmethod
    def from_arguments(
        cls, args: argparse.Namespace, environ: Mapping[str, str] = os.environ
    ) -> ClientTls:
        """From ``add_client_tls_arguments``'s flags, each else its variable."""
        variables = cls.from_environment(environ)
        return cls(
            ca_file=args.tls_ca or variables.ca_file,
            cert_file=args.tls_cert or variables.cert_file,
            key_file=args.tls_key or variables.key_file,
            server_name=args.tls_server_name or variables.server_name,
        )


def add_client_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """How a client reaches a TLS server: the CLI's clients and the load tools share
    these flags, each falling back to its environment variable."""
    parser.add_argument("--tls-ca", help="CA file to trust the server (STREAMSCORE_TLS_CA); TLS on")
    parser.add_argument(
        "--tls-cert", help="client certificate for mutual TLS (STREAMSCORE_TLS_CLIENT_CERT)"
    )
    parser.add_argument("--tls-key", help="client key for mutual TLS (STREAMSCORE_TLS_CLIENT_KEY)")
    parser.add_argument(
        "--tls-server-name",
        help="name on the server certificate, if not the target's host "
        "(STREAMSCORE_TLS_SERVER_NAME)",
    )
