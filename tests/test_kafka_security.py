"""TLS and SASL for the Kafka clients (stream/kafka_security.py): the settings, what
the clients are given, and a real TLS connection from them."""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import faust
import pytest
from test_tls import Authority

from streamscore.config import Settings, load_settings
from streamscore.stream import kafka_security
from streamscore.stream.broker import create_topics
from streamscore.stream.kafka_security import KafkaSecurity

PASSWORD = "hunter2-not-to-be-seen"


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path, "kafka-ca")


@pytest.fixture
def secured() -> Iterator[None]:
    """Whatever a test configures is undone after it (the setting is process-wide)."""
    before = kafka_security.configured()
    yield
    kafka_security.configure(before)


def test_plaintext_adds_nothing() -> None:
    assert KafkaSecurity().client_kwargs() == {}
    assert KafkaSecurity().faust_credentials() is None


def test_sasl_ssl_gives_every_client_the_same_security(authority: Authority) -> None:
    security = KafkaSecurity(
        protocol="sasl_ssl",
        ssl_cafile=authority.ca_file,
        sasl_mechanism="scram-sha-512",
        sasl_username="streamscore",
        sasl_password=PASSWORD,
    )
    security.check()
    kwargs = security.client_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == (
        "streamscore",
        PASSWORD,
    )
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    credentials = security.faust_credentials()
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.ssl_context is not None and credentials.mechanism.value == "SCRAM-SHA-512"
    assert PASSWORD not in repr(security)
    client_cert, client_key = authority.issue("client", server=False)
    mutual = KafkaSecurity(
        protocol="ssl",
        ssl_cafile=authority.ca_file,
        ssl_certfile=client_cert,
        ssl_keyfile=client_key,
    )
    assert isinstance(mutual.faust_credentials(), faust.SSLCredentials)


@pytest.mark.parametrize(
    ("fields", "refusal"),
    [
        ({"protocol": "sasl_ssl"}, "needs kafka_sasl_username and kafka_sasl_password"),
        ({"protocol": "tls"}, "kafka_security_protocol: 'tls' is not one of"),
        ({"protocol": "ssl", "sasl_username": "u"}, "kafka_sasl_username or kafka_sasl_pass"),
        ({"protocol": "ssl", "sasl_mechanism": "gssapi"}, "kafka_sasl_mechanism: 'gssapi'"),
        ({"ssl_cafile": "CA"}, "kafka_ssl_\\* files are set but kafka_security_protocol is"),
        ({"protocol": "ssl", "ssl_cafile": "/nonexistent/ca.pem"}, "no file /nonexistent"),
        ({"protocol": "ssl", "ssl_certfile": "CERT"}, "go together"),
        ({"protocol": "ssl", "ssl_cafile": "KEY"}, "kafka_ssl_cafile: .* holds no CA certificate"),
        (
            {"protocol": "ssl", "ssl_certfile": "CERT", "ssl_keyfile": "OTHER_KEY"},
            "do not load as a certificate and its unencrypted key",
        ),
        (
            {"protocol": "ssl", "ssl_certfile": "CERT", "ssl_keyfile": "ENCRYPTED_KEY"},
            "do not load as a certificate and its unencrypted key",
        ),
    ],
)
def test_a_security_that_cannot_connect_is_refused_naming_the_setting(
    authority: Authority, tmp_path: Path, fields: dict[str, str], refusal: str
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert, key = authority.issue("client", server=False)
    _, other_key = authority.issue("other", server=False)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    files = {
        "CA": authority.ca_file,
        "CERT": cert,
        "KEY": key,
        "OTHER_KEY": other_key,
        "ENCRYPTED_KEY": str(encrypted),
    }
    security = KafkaSecurity(**{name: files.get(value, value) for name, value in fields.items()})
    with pytest.raises(ValueError, match=refusal) as refused:
        security.check()
    assert PASSWORD not in str(refused.value)


def test_settings_carry_the_security_and_keep_the_password_secret(
    authority: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMSCORE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMSCORE_KAFKA_SSL_CAFILE", authority.ca_file)
    monkeypatch.setenv("STREAMSCORE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("STREAMSCORE_KAFKA_SASL_USERNAME", "streamscore")
    monkeypatch.setenv("STREAMSCORE_KAFKA_SASL_PASSWORD", PASSWORD)
    settings = load_settings(None, {})
    security = settings.kafka_security
    assert (security.protocol, security.sasl_mechanism) == ("sasl_ssl", "scram-sha-256")
    assert security.sasl_password == PASSWORD
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings.redacted())
    monkeypatch.delenv("STREAMSCORE_KAFKA_SASL_PASSWORD")
    with pytest.raises(ValueError, match="needs kafka_sasl_username and kafka_sasl_password"):
        load_settings(None, {})
    assert Settings().kafka_security == KafkaSecurity()


async def test_clients_speak_tls_to_the_cluster_and_check_its_certificate(
    authority: Authority, secured: None
) -> None:
    """A TLS listener standing in for a broker: with ``ssl`` configured, a client (the
    topic creation every part runs) completes a TLS handshake, verifying the listener's
    certificate against the CA file, and sends its first Kafka request inside it."""
    server_cert, server_key = authority.issue("broker", server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert, server_key)
    first_requests: list[int] = []

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = struct.unpack(">i", await reader.readexactly(4))[0]
            body = await reader.readexactly(size)
            first_requests.append(struct.unpack(">h", body[:2])[0])  # the API key
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(broker, "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    try:
        kafka_security.configure(KafkaSecurity(protocol="ssl", ssl_cafile=authority.ca_file))
        with pytest.raises(Exception):  # noqa: B017 - no broker answers: any failure
            await create_topics(f"127.0.0.1:{port}", {"payments": 1}, request_timeout_s=2)
        # Kafka's ApiVersions (18) or Metadata (3), read through TLS.
        assert first_requests and set(first_requests) <= {3, 18}, first_requests
        # A CA that did not sign the listener's certificate: no handshake, no request.
        first_requests.clear()
        rogue = Authority(Path(authority.ca_file).parent, "rogue-ca")
        kafka_security.configure(KafkaSecurity(protocol="ssl", ssl_cafile=rogue.ca_file))
        with pytest.raises(Exception):  # noqa: B017
            await create_topics(f"127.0.0.1:{port}", {"payments": 1}, request_timeout_s=2)
        assert not first_requests
    finally:
        listener.close()
        await listener.wait_closed()
