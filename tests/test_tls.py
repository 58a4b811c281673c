"""TLS and mutual TLS on the real server with generated certificates; message size
limits; secrets never echoed."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from streamscore._proto.v1 import scoring_pb2 as pb
from streamscore._proto.v1 import scoring_pb2_grpc as pb_grpc
from streamscore.cli import main as cli_main
from streamscore.config import Settings, load_settings
from streamscore.server.app import ScoringServer
from streamscore.tls import (
    ClientTls,
    TlsError,
    add_client_tls_arguments,
    check_server_files,
    server_credentials,
)

from system import run_module

TOKEN = "s3cret-admin-token-value"


class Authority:
    """A throwaway certificate authority writing PEM files into a directory."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.name = subject
        self.cert = (
            self._builder(subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = self._write(
            f"{name}.crt", self.cert.public_bytes(serialization.Encoding.PEM)
        )

    def _builder(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        expires_in: datetime.timedelta = datetime.timedelta(days=30),
        starts_in: datetime.timedelta | None = None,
    ) -> x509.CertificateBuilder:
        # 30 days by default: more than the server's warning threshold (7 days).
        now = datetime.datetime.now(datetime.UTC)
        starts = now + starts_in if starts_in is not None else min(now, now + expires_in)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(getattr(self, "name", subject))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(starts - datetime.timedelta(days=1 if starts_in is None else 0))
            .not_valid_after(now + expires_in)
        )

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)

    def issue(
        self,
        name: str,
        *,
        server: bool,
        expires_in: datetime.timedelta = datetime.timedelta(days=30),
        starts_in: datetime.timedelta | None = None,
        passphrase: bytes = b"",
    ) -> tuple[str, str]:
        """(certificate file, key file) for localhost / 127.0.0.1 (server) or a client;
        ``expires_in`` may be negative (an expired certificate), ``starts_in`` positive
        (one not yet valid), ``passphrase`` encrypts the key."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = self._builder(subject, key.public_key(), expires_in, starts_in)
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        return (
            self._write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
            self._write(
                f"{name}.key",
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(passphrase)
                    if passphrase
                    else serialization.NoEncryption(),
                ),
            ),
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(directory, "test-ca"), Authority(directory, "rogue-ca")
    return {
        "ca": ca.ca_file,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "rogue_client": rogue.issue("rogue-client", server=False),
    }


@contextlib.asynccontextmanager
async def serving(trained_model: Path, tmp_path: Path, **overrides: object) -> AsyncIterator[str]:
    repository = tmp_path / "models"
    if not repository.exists():
        shutil.copytree(trained_model, repository)
    settings = Settings(
        port=0, model_repository=repository, model_reload_interval_s=0, admin_token=TOKEN
    ).override(dict(overrides))
    server = ScoringServer(settings)
    await server.start()
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop()


def request(card: str = "card-1", merchant: str = "m-1") -> pb.ScoreRequest:
    return pb.ScoreRequest(
        request_id="r-1",
        transaction=pb.Transaction(
            transaction_id="t-1",
            card_id=card,
            merchant_id=merchant,
            device_id="d-1",
            ip="198.51.100.7",
            amount_minor=1_234,
            currency="EUR",
            mcc="5411",
            country="DE",
        ),
    )


async def score(
    target: str, tls: ClientTls, req: pb.ScoreRequest | None = None
) -> pb.ScoreResponse:
    async with tls.aio_channel(target) as channel:
        return await pb_grpc.ScoringStub(channel).Score(req or request(), timeout=5)


async def refused(target: str, tls: ClientTls) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await score(target, tls)
    return caught.value.code()


async def test_tls_serves_trusting_clients_and_refuses_plaintext(
    trained_model: Path, tmp_path: Path, pki: dict
) -> None:
    cert, key = pki["server"]
    async with serving(trained_model, tmp_path, tls_cert_file=cert, tls_key_file=key) as target:
        reply = await score(target, ClientTls(ca_file=pki["ca"]))
        assert reply.request_id == "r-1" and 0 <= reply.score <= 1
        assert await refused(target, ClientTls()) == grpc.StatusCode.UNAVAILABLE
        # A client that trusts another CA does not accept this server.
        rogue_ca = str(Path(pki["rogue_client"][0]).parent / "rogue-ca.crt")
        assert await refused(target, ClientTls(ca_file=rogue_ca)) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_clients_without_a_valid_certificate(
    trained_model: Path, tmp_path: Path, pki: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = pki["server"]
    async with serving(
        trained_model, tmp_path, tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=pki["ca"]
    ) as target:
        client_cert, client_key = pki["client"]
        good = ClientTls(ca_file=pki["ca"], cert_file=client_cert, key_file=client_key)
        assert (await score(target, good)).request_id == "r-1"
        assert await refused(target, ClientTls(ca_file=pki["ca"])) == grpc.StatusCode.UNAVAILABLE
        rogue_cert, rogue_key = pki["rogue_client"]
        rogue = ClientTls(ca_file=pki["ca"], cert_file=rogue_cert, key_file=rogue_key)
        assert await refused(target, rogue) == grpc.StatusCode.UNAVAILABLE
        # The CLI (Admin API and health check) over mutual TLS, flags as a user types them.
        tls_flags = ["--target", target, "--tls-ca", pki["ca"]]
        tls_flags += ["--tls-cert", client_cert, "--tls-key", client_key]
        capsys.readouterr()
        assert await asyncio.to_thread(cli_main, ["health", *tls_flags]) == 0
        assert (
            await asyncio.to_thread(cli_main, ["rollout", "show", "--token", TOKEN, *tls_flags])
            == 0
        )
        out = capsys.readouterr().out
        assert "SERVING" in out and "primary" in out
        assert (
            await asyncio.to_thread(cli_main, ["health", "--target", target, "--tls-ca", pki["ca"]])
            == 1
        )


async def test_bad_tls_settings_fail_the_start_clearly(
    trained_model: Path, tmp_path: Path, pki: dict
) -> None:
    cert, _ = pki["server"]
    for overrides, message in (
        ({"tls_cert_file": cert}, "both tls_cert_file and tls_key_file"),
        ({"tls_client_ca_file": pki["ca"]}, "needs tls_cert_file"),
        ({"tls_cert_file": cert, "tls_key_file": str(tmp_path / "nope.key")}, "cannot read"),
    ):
        with pytest.raises(TlsError, match=message):
            async with serving(trained_model, tmp_path, **overrides):
                pass


async def test_tls_files_that_cannot_serve_fail_the_start_naming_file_and_reason(
    trained_model: Path, tmp_path: Path, pki: dict
) -> None:
    """gRPC core takes these, then fails to bind: the start said "Failed to bind ...
    (the port is in use?)", the cause only in gRPC's plain-text log lines."""
    authority = Authority(tmp_path, "start-ca")
    cert, key = authority.issue("start-server", server=True)
    _, other_key = authority.issue("other", server=True)
    encrypted = authority.issue("locked", server=True, passphrase=b"secret")
    for overrides, message in (
        ({"tls_key_file": other_key}, f"TLS key '{other_key}' does not match the certificate"),
        ({"tls_cert_file": encrypted[0], "tls_key_file": encrypted[1]}, "is encrypted"),
        ({"tls_cert_file": key, "tls_key_file": cert}, "swapped"),
        ({"tls_key_file": cert}, f"TLS key '{cert}' is not a PEM private key"),
        ({"tls_cert_file": key}, f"TLS certificate '{key}' is not a PEM certificate"),
        ({"tls_client_ca_file": key}, f"client CA file '{key}' holds no certificate"),
    ):
        settings = {"tls_cert_file": cert, "tls_key_file": key, **overrides}
        with pytest.raises(TlsError, match=re.escape(message)):
            async with serving(trained_model, tmp_path, **settings):
                pass
    # The good pair, with the client CA, still serves.
    client_ca = {"tls_client_ca_file": pki["ca"]}
    async with serving(
        trained_model, tmp_path, tls_cert_file=cert, tls_key_file=key, **client_ca
    ) as target:
        client_cert, client_key = pki["client"]
        good = ClientTls(ca_file=authority.ca_file, cert_file=client_cert, key_file=client_key)
        assert (await score(target, good)).request_id == "r-1"


def test_an_expired_certificate_is_refused_and_one_expiring_soon_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An expired server certificate was served without a word (every client, the
    health check too, then refused it)."""
    authority = Authority(tmp_path, "expiry-ca")
    cert, key = authority.issue("expired", server=True, expires_in=-datetime.timedelta(hours=1))
    with pytest.raises(TlsError, match=rf"TLS certificate '{re.escape(cert)}' expired on 20\d\d-"):
        server_credentials(cert, key)
    # Not yet valid: every client refused it too (it was served without a word).
    cert, key = authority.issue("early", server=True, starts_in=datetime.timedelta(days=2))
    with pytest.raises(TlsError, match=rf"'{re.escape(cert)}' is not valid before 20\d\d-"):
        server_credentials(cert, key)
    caplog.set_level(logging.WARNING, logger="streamscore.tls")
    cert, key = authority.issue("fresh", server=True)
    assert server_credentials(cert, key) is not None
    assert not caplog.records
    cert, key = authority.issue("soon", server=True, expires_in=datetime.timedelta(days=2))
    assert server_credentials(cert, key) is not None
    [record] = caplog.records
    assert "expires soon" in record.getMessage() and record.__dict__["file"] == cert
    # A supervisor's own check (serve --workers) leaves the warning to its workers:
    # with two workers it was logged three times.
    check_server_files(cert, key, warn_expiry=False)
    assert len(caplog.records) == 1


async def test_the_open_loop_sweep_loads_a_mutual_tls_server(
    trained_model: Path, tmp_path: Path, pki: dict
) -> None:
    """A TLS deployment is load-tested as deployed: the load tools spoke plaintext only."""
    cert, key = pki["server"]
    client_cert, client_key = pki["client"]
    async with serving(
        trained_model, tmp_path, tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=pki["ca"]
    ) as target:
        out = tmp_path / "sweep.json"
        sweep = ["loadtest.sweep", "--target", target, "--rates", "20", "--seconds", "1"]
        sweep += ["--clients", "1", "--requests", "100", "--budget-p99-ms", "5000"]
        tls = ["--tls-ca", pki["ca"], "--tls-cert", client_cert, "--tls-key", client_key]
        for rpc in ("score", "stream"):
            output = await run_module(*sweep, "--rpc", rpc, *tls, "--json", str(out), timeout=60)
            [row] = json.loads(out.read_text())["rows"]
            assert (row["ok"], row["errors"]) == (20, 0), output
        # Without them the sweep cannot reach it, and says why.
        output = await run_module(*sweep, "--json", str(out), timeout=60, expect_exit_0=False)
        assert "UNAVAILABLE" in output, output
        # Not trusting the server: said at once, not after its 30 s wait for a server
        # still starting (no retry mends a certificate).
        rogue_ca = str(Path(pki["rogue_client"][0]).parent / "rogue-ca.crt")
        started = time.monotonic()
        output = await run_module(
            *sweep, "--tls-ca", rogue_ca, "--json", str(out), timeout=60, expect_exit_0=False
        )
        assert "CERTIFICATE_VERIFY_FAILED" in output or "certificate verify" in output, output
        assert time.monotonic() - started < 25, output
        # Nor a server whose certificate names another host.
        started = time.monotonic()
        name = ["--tls-server-name", "elsewhere.example"]
        output = await run_module(
            *sweep, *tls, *name, "--json", str(out), timeout=60, expect_exit_0=False
        )
        assert "Hostname Verification Check failed" in output, output
        assert time.monotonic() - started < 25, output
        # Nor a server that refuses the client's certificate (none here): it closes
        # each connection, where one still starting refuses it; the sweep waited 30 s.
        started = time.monotonic()
        output = await run_module(
            *sweep, "--tls-ca", pki["ca"], "--json", str(out), timeout=60, expect_exit_0=False
        )
        assert "does it require a client certificate" in output, output
        assert time.monotonic() - started < 20, output


def test_client_flags_fall_back_to_the_environment_one_by_one() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_client_tls_arguments(parser)
    environ = {"STREAMSCORE_TLS_CA": "/env-ca.pem", "STREAMSCORE_TLS_SERVER_NAME": "env-name"}
    args = parser.parse_args(["--tls-ca", "/flag-ca.pem", "--tls-cert", "/c.pem"])
    assert ClientTls.from_arguments(args, environ) == ClientTls(
        ca_file="/flag-ca.pem", cert_file="/c.pem", server_name="env-name"
    )
    assert ClientTls.from_environment({}) == ClientTls() and not ClientTls().enabled


async def test_health_says_why_it_failed(
    trained_model: Path, tmp_path: Path, pki: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    """The container's health check printed only "UNAVAILABLE" for a server that is up
    but not trusted (the image's TLS variables incomplete)."""
    cert, key = pki["server"]
    async with serving(trained_model, tmp_path, tls_cert_file=cert, tls_key_file=key) as target:
        rogue_ca = str(Path(pki["rogue_client"][0]).parent / "rogue-ca.crt")
        capsys.readouterr()
        health = ["health", "--target", target, "--tls-ca", rogue_ca]
        assert await asyncio.to_thread(cli_main, health) == 1
    err = capsys.readouterr().err
    assert f"{target}: UNAVAILABLE: " in err, err
    assert "CERTIFICATE_VERIFY_FAILED" in err or "certificate verify failed" in err, err


async def test_oversized_messages_are_refused(trained_model: Path, tmp_path: Path) -> None:
    async with serving(trained_model, tmp_path, max_message_bytes=16 * 1024) as target:
        assert (await score(target, ClientTls())).request_id == "r-1"
        huge = request(merchant="m" * 20_000)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await score(target, ClientTls(), huge)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The server is fine afterwards.
        assert (await score(target, ClientTls())).request_id == "r-1"


async def test_secrets_are_never_echoed(
    trained_model: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(environ={"STREAMSCORE_ADMIN_TOKEN": TOKEN})
    assert settings.admin_token == TOKEN
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.redacted())
    assert settings.redacted()["admin_token"] == "***"
    monkeypatch.setenv("STREAMSCORE_ADMIN_TOKEN", TOKEN)
    assert cli_main(["config"]) == 0
    printed = capsys.readouterr().out
    assert 'admin_token = "***"' in printed and TOKEN not in printed
    caplog.set_level(logging.DEBUG)
    async with serving(trained_model, tmp_path, log_level="debug") as target:
        # A wrong token is refused without the server repeating either token.
        wrong = ["rollout", "show", "--target", target, "--token", "wrong-" + TOKEN]
        assert await asyncio.to_thread(cli_main, wrong) == 1
    captured = capsys.readouterr()
    everything = caplog.text + captured.out + captured.err
    assert "UNAUTHENTICATED" in captured.err
    assert TOKEN not in everything
