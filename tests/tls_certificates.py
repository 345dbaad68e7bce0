"""Throwaway certificate authorities and certificates for the DICOM TLS tests.

Made with the `openssl` command line (OpenSSL 3), valid for two days, with P-256 keys.
Nothing here is fit for production use.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_VALID_DAYS = "2"


@dataclass(frozen=True)
class CertificateFiles:
    """A PEM certificate and its unencrypted PEM private key."""

    certificate_file: Path
    private_key_file: Path


@dataclass(frozen=True)
class ThrowawayPKI:
    """Two independent CAs, each with a server and a client certificate.

    The server certificates name DNS:localhost and IP:127.0.0.1.
    """

    ca_file: Path
    server: CertificateFiles
    client: CertificateFiles
    other_ca_file: Path
    other_server: CertificateFiles
    other_client: CertificateFiles


def _openssl(*arguments: str) -> None:
    result = subprocess.run(["openssl", *arguments], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(arguments)} failed: {result.stderr}")


def _make_ca(folder: Path, name: str) -> CertificateFiles:
    files = CertificateFiles(folder / f"{name}.pem", folder / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(files.private_key_file), "-out", str(files.certificate_file),
        "-days", _VALID_DAYS, "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )
    return files


def _make_leaf(folder: Path, name: str, ca: CertificateFiles, extensions: str, serial: int) -> CertificateFiles:
    files = CertificateFiles(folder / f"{name}.pem", folder / f"{name}.key")
    request_file = folder / f"{name}.csr"
    extensions_file = folder / f"{name}.ext"
    extensions_file.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n" + extensions
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(files.private_key_file), "-out", str(request_file), "-subj", f"/CN={name}",
    )
    _openssl(
        "x509", "-req", "-in", str(request_file), "-CA", str(ca.certificate_file),
        "-CAkey", str(ca.private_key_file), "-set_serial", str(serial), "-days", _VALID_DAYS,
        "-extfile", str(extensions_file), "-out", str(files.certificate_file),
    )
    files.private_key_file.chmod(0o600)
    return files


def make_test_pki(folder: Path) -> ThrowawayPKI:
    """Create two CAs in `folder`, each signing a server and a client certificate."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is not installed: apt-get install openssl")
    folder.mkdir(parents=True, exist_ok=True)
    server_extensions = "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    client_extensions = "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    ca = _make_ca(folder, "test-ca")
    other_ca = _make_ca(folder, "other-ca")
    return ThrowawayPKI(
        ca_file=ca.certificate_file,
        server=_make_leaf(folder, "localhost", ca, server_extensions, serial=1),
        client=_make_leaf(folder, "modality1", ca, client_extensions, serial=2),
        other_ca_file=other_ca.certificate_file,
        other_server=_make_leaf(folder, "other-localhost", other_ca, server_extensions, serial=3),
        other_client=_make_leaf(folder, "other-modality1", other_ca, client_extensions, serial=4),
    )
