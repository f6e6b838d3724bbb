"""HTTPS servers with a self-signed certificate.

Debian's Orthanc 1.10.1 crashes (SIGSEGV) on its first HTTPS connection with
this machine's OpenSSL 3, so HTTPS comes from a TLS-terminating proxy on
127.0.0.1 in front of each real Orthanc server, as a reverse proxy such as
nginx would. Both the REST calls and the instance-file copies must check the
certificate against the configured CA file and refuse a server they cannot
trust.
"""

from __future__ import annotations

import contextlib
import shutil
import ssl
import subprocess

import pytest
from faultproxy import FaultProxy
from guarantees import (
    FAST_FAILURE_ENV,
    assert_main_untouched,
    assert_migrated,
    upload_study,
)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1: (certificate file, key file)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing: scripts/test.sh installs it")
    directory = tmp_path_factory.mktemp("tls")
    key, certificate = directory / "key.pem", directory / "certificate.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-keyout", str(key), "-out", str(certificate), "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return certificate, key


@pytest.fixture
def https_urls(main, backup, certificate):
    """HTTPS addresses of Main and Backup, served through TLS proxies."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    with contextlib.ExitStack() as stack:
        proxies = [
            stack.enter_context(FaultProxy(server.url, tls_context=context))
            for server in (main, backup)
        ]
        yield {
            "ORTHANC_MAIN_URL": proxies[0].url,
            "ORTHANC_BACKUP_URL": proxies[1].url,
        }


@pytest.mark.parametrize("transfer", ["zip", "instances"])
def test_https_with_ca_bundle(
    main, backup, https_urls, certificate, run_rotate, tmp_path, transfer
):
    study = upload_study(main, tmp_path / "study", instances=3)
    env = {
        **https_urls,
        "ORTHANC_MAIN_CA_BUNDLE": str(certificate[0]),
        "ORTHANC_BACKUP_CA_BUNDLE": str(certificate[0]),
    }

    result = run_rotate("--transfer", transfer, env=env)

    assert result.returncode == 0, result.stderr
    assert_migrated(main, backup, study)


@pytest.mark.parametrize("untrusted", ["main", "backup"])
def test_https_untrusted_certificate_keeps_study(
    main, backup, https_urls, certificate, run_rotate, tmp_path, untrusted
):
    study = upload_study(main, tmp_path / "study", instances=3)
    trusted = "backup" if untrusted == "main" else "main"
    env = {
        **https_urls,
        **FAST_FAILURE_ENV,
        f"ORTHANC_{trusted.upper()}_CA_BUNDLE": str(certificate[0]),
    }

    result = run_rotate("--transfer", "instances", env=env)

    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "TLS certificate is not trusted" in result.stderr
    assert untrusted.capitalize() in result.stderr
    assert_main_untouched(main, study)
    assert backup.study_ids() == []
