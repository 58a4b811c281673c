"""TLS and SASL for the Kafka clients: the server's replica and decision log, the
worker (Faust and its own consumers), topic creation and the demo's producer.

A managed or production cluster (MSK, Confluent Cloud, most on-premises ones) takes
TLS and usually SASL; payment events must not cross a network in clear. A process
sets its security once from its settings (``configure``, at the start of ``serve``,
``worker`` and ``demo``), and every client takes ``client_kwargs()`` (aiokafka) or
``faust_credentials()`` (Faust) from it: each of them connects to the same cluster, so
one value per process, rather than a parameter threaded through every constructor.
Plaintext (the default, and the embedded broker's) adds nothing.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamscore.tls import TlsError, refuse_passphrase

PROTOCOLS = ("plaintext", "ssl", "sasl_plaintext", "sasl_ssl")
SASL_MECHANISMS = ("plain", "scram-sha-256", "scram-sha-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """How clients connect: ``protocol`` (Kafka's ``security.protocol``, lowercased),
    TLS files (PEM; an empty CA file: the system's trusted CAs), and SASL's mechanism
    and credentials (the password a secret: never in repr, logs or errors)."""

    protocol: str = "plaintext"
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    sasl_mechanism: str = "plain"
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)

    @property
    def tls(self) -> bool:
        return self.protocol in ("ssl", "sasl_ssl")

    @property
    def sasl(self) -> bool:
        return self.protocol in ("sasl_plaintext", "sasl_ssl")

    def check(self) -> None:
        """ValueError naming the setting when the combination cannot connect: SASL
        without its credentials, TLS files set without TLS, or files that do not load
        (each named, never a secret)."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"setting kafka_security_protocol: {self.protocol!r} is not one of "
                f"{', '.join(PROTOCOLS)}"
            )
        if self.sasl_mechanism not in SASL_MECHANISMS:
            raise ValueError(
                f"setting kafka_sasl_mechanism: {self.sasl_mechanism!r} is not one of "
                f"{', '.join(SASL_MECHANISMS)}"
            )
        if not self.sasl and (self.sasl_username or self.sasl_password):
            raise ValueError(
                "kafka_sasl_username or kafka_sasl_password is set but "
                f"kafka_security_protocol is {self.protocol}: set it to sasl_ssl or "
                "sasl_plaintext"
            )
        if self.sasl and not (self.sasl_username and self.sasl_password):
            raise ValueError(
                f"kafka_security_protocol {self.protocol} needs kafka_sasl_username and "
                "kafka_sasl_password (set the password through STREAMSCORE_KAFKA_SASL_PASSWORD)"
            )
        files = {
            "kafka_ssl_cafile": self.ssl_cafile,
            "kafka_ssl_certfile": self.ssl_certfile,
            "kafka_ssl_keyfile": self.ssl_keyfile,
        }
        if not self.tls and any(files.values()):
            raise ValueError(
                "kafka_ssl_* files are set but kafka_security_protocol is "
                f"{self.protocol}: set it to ssl or sasl_ssl"
            )
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("kafka_ssl_certfile and kafka_ssl_keyfile go together")
        for name, path in files.items():
            if path and not Path(path).is_file():
                raise ValueError(f"setting {name}: no file {path}")
        if self.tls:
            _ = self.ssl_context  # the files load

    @functools.cached_property
    def ssl_context(self) -> ssl.SSLContext:
        """A client context verifying the brokers' certificates and names (against
        the CA file, else the system's CAs), with this client's certificate when set
        (mutual TLS). Built once: the start's check and every client share it."""
        try:
            context = ssl.create_default_context(cafile=self.ssl_cafile or None)
        except (ssl.SSLError, OSError) as error:
            raise ValueError(
                f"setting kafka_ssl_cafile: {self.ssl_cafile} holds no CA certificate ({error})"
            ) from None
        if self.ssl_certfile:
            try:
                context.load_cert_chain(
                    self.ssl_certfile,
                    self.ssl_keyfile,
                    password=refuse_passphrase(self.ssl_keyfile),
                )
            except (ssl.SSLError, OSError, TlsError) as error:
                raise ValueError(
                    f"settings kafka_ssl_certfile and kafka_ssl_keyfile: {self.ssl_certfile} "
                    f"and {self.ssl_keyfile} do not load as a certificate and its "
                    f"unencrypted key ({error})"
                ) from None
        return context

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's producers, consumers and clients."""
        if self.protocol == "plaintext":
            return {}
        kwargs: dict[str, Any] = {"security_protocol": self.protocol.upper()}
        if self.tls:
            kwargs["ssl_context"] = self.ssl_context
        if self.sasl:
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism.upper(),
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        return kwargs

    def faust_credentials(self) -> Any:
        """Faust's ``broker_credentials`` (None: plaintext)."""
        import faust

        if self.sasl:
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password,
                ssl_context=self.ssl_context if self.tls else None,
                mechanism=self.sasl_mechanism.upper(),
            )
        if self.tls:
            return faust.SSLCredentials(self.ssl_context)
        return None


_configured = KafkaSecurity()


def configure(security: KafkaSecurity) -> None:
    """This process's security for every Kafka client it makes from now on."""
    global _configured
    security.check()
    _configured = security


def configured() -> KafkaSecurity:
    return _configured


def client_kwargs() -> dict[str, Any]:
    """``KafkaSecurity.client_kwargs`` of this process's security."""
    return _configured.client_kwargs()


def faust_credentials() -> Any:
    return _configured.faust_credentials()
