"""``INTAKE_REDIS_URL`` beyond a plain socket: Redis Sentinel and TLS, against real servers
(Debian's redis-server 7, which is built with TLS and runs as a Sentinel with ``--sentinel``)."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from intake.core.errors import ConfigError
from intake.core.redis_conn import make_async_client, make_client, redis_urls
from intake.core.redis_url import SentinelUrl, parse_sentinel_url
from intake.core.settings import load_settings
from tests.functional.test_serve import free_port

SYSTEM_REDIS = shutil.which("redis-server", path="/usr/bin:/usr/local/bin")


def test_sentinel_urls_parse_and_bad_ones_are_refused(tmp_path: Path) -> None:
    assert parse_sentinel_url("redis+sentinel://s1:26379,s2:26380/mymaster/2") == SentinelUrl(
        (("s1", 26379), ("s2", 26380)), "mymaster", 2)
    found = parse_sentinel_url("redis+sentinel://intake-broker:p%40ss@s1:26379/mymaster")
    assert found is not None and (found.username, found.password, found.db) == ("intake-broker", "p@ss", 0)
    assert "p@ss" not in repr(found)
    assert parse_sentinel_url("redis://localhost:6379/0") is None
    for bad in ("redis+sentinel://s1/mymaster", "redis+sentinel://s1:26379", "redis+sentinel://s1:26379/m/x",
                "redis+sentinel://s1:26379/my master", "redis+sentinel://s1:26379/m\n"):
        with pytest.raises(ValueError):
            parse_sentinel_url(bad)
        with pytest.raises(ConfigError, match="INTAKE_REDIS_URL"):
            load_settings(_env_file=None, data_dir=tmp_path, redis_url=bad)
    load_settings(_env_file=None, data_dir=tmp_path, redis_url="redis+sentinel://s1:26379/mymaster")


def wait_ping(client: redis.Redis, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.ping():
                return
        except redis.RedisError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("the test redis-server did not start")
        time.sleep(0.05)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.skipif(SYSTEM_REDIS is None, reason="needs Debian's redis-server")
async def test_a_sentinel_url_finds_the_master(tmp_path: Path, spawn: list) -> None:  # type: ignore[type-arg]
    master, sentinel = free_port(), free_port()
    base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    spawn.append(subprocess.Popen([SYSTEM_REDIS, "--port", str(master), *base],  # type: ignore[list-item]
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_ping(redis.Redis(port=master), spawn[-1])
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {master} 1\n")
    spawn.append(subprocess.Popen([SYSTEM_REDIS, str(conf), "--sentinel"],  # type: ignore[list-item]
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_ping(redis.Redis(port=sentinel), spawn[-1])
    url = f"redis+sentinel://127.0.0.1:{sentinel}/mymaster/3"
    client = make_client(url)
    client.set("intake:k", "via sentinel")
    assert redis.Redis(port=master, db=3, decode_responses=True).get("intake:k") == "via sentinel"
    aclient = make_async_client(url)
    assert await aclient.get("intake:k") == "via sentinel"
    await aclient.aclose()
    with pytest.raises(redis.RedisError):  # a service the Sentinels do not know
        make_client(f"redis+sentinel://127.0.0.1:{sentinel}/othermaster").ping()


def _cert(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed, made here (cryptography)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intake test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.mark.skipif(SYSTEM_REDIS is None, reason="needs Debian's redis-server")
def test_rediss_with_the_configured_ca_verifies_the_server(tmp_path: Path, spawn: list) -> None:  # type: ignore[type-arg]
    ca, cert, key = _cert(tmp_path)
    port = free_port()
    spawn.append(subprocess.Popen(
        [SYSTEM_REDIS, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    url = f"rediss://127.0.0.1:{port}/0"
    settings = load_settings(_env_file=None, data_dir=tmp_path / "d", redis_url=url, redis_ca_file=ca)
    with redis_urls(settings) as urls:
        client = make_client(urls["broker"])
        wait_ping(client, spawn[-1])
        client.set("intake:k", "over tls")
        assert client.get("intake:k") == "over tls"
    # Without the CA the server's certificate is not trusted: refused, not silently accepted.
    with pytest.raises(redis.ConnectionError):
        make_client(url).ping()
    # A plain-text client gets nothing from the TLS port either.
    with pytest.raises(redis.RedisError):
        make_client(f"redis://127.0.0.1:{port}/0").ping()
