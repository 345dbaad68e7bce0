"""DICOM TLS: the SSL contexts of the receiver and the sender, and the receiver's handshake.

Promise: every context rejects protocol versions older than TLS 1.2. The receiver's context
requires a client certificate signed by the configured CA bundle when one is configured
(mutual TLS). The sender's context verifies the destination's certificate chain and host name.
"""

from __future__ import annotations

import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog

from node.config import ConfigError, DestinationSettings, QuerySourceSettings

log = structlog.get_logger(__name__)

MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


class TLSConfigError(ConfigError):
    """A configured certificate, private key or CA bundle cannot be loaded."""


class TLSHandshakeError(OSError):
    """The TLS handshake with a peer failed or timed out."""


@dataclass(frozen=True)
class TLSSession:
    """The negotiated parameters of an established TLS connection, for log lines."""

    tls_version: str
    cipher: str
    peer_certificate_subject: str


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets do their handshake only when asked.

    pynetdicom 3.0 wraps each accepted socket in the thread that accepts connections. With
    the default handshake on wrap, one peer that connects and sends nothing blocks every
    later connection, so the receiver calls `complete_server_handshake` in the
    association's own thread instead.
    """

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, *args, **kwargs):
        return super().wrap_socket(sock, server_side, False, *args, **kwargs)


def _check_file(path: Path, key: str) -> Path:
    if not path.is_file():
        raise TLSConfigError(f"{key} = {str(path)!r}: file not found; give the path of a PEM file")
    return path


def _warn_if_key_readable_by_others(private_key_file: Path, key: str) -> None:
    mode = private_key_file.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "tls.private_key_readable_by_others",
            key=key,
            path=str(private_key_file),
            mode=oct(stat.S_IMODE(mode)),
            reason="run 'chmod 600' on the private key file",
        )


def _load_certificate_chain(context: ssl.SSLContext, certificate_file: Path, private_key_file: Path, section: str) -> None:
    certificate_key = f"{section} tls_certificate_file"
    private_key_key = f"{section} tls_private_key_file"
    _check_file(certificate_file, certificate_key)
    _check_file(private_key_file, private_key_key)
    _warn_if_key_readable_by_others(private_key_file, private_key_key)
    try:
        context.load_cert_chain(certificate_file, private_key_file)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"{certificate_key} = {str(certificate_file)!r} and {private_key_key} = "
            f"{str(private_key_file)!r} cannot be loaded ({exc.reason or exc}); give a PEM "
            "certificate and its unencrypted PEM private key"
        ) from exc


def _load_ca_bundle(context: ssl.SSLContext, ca_file: Path, section: str) -> None:
    key = f"{section} tls_ca_file"
    _check_file(ca_file, key)
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"{key} = {str(ca_file)!r} cannot be loaded ({exc.reason or exc}); give a file of "
            "PEM CA certificates"
        ) from exc


def server_context(certificate_file: Path, private_key_file: Path, ca_file: Path | None) -> ssl.SSLContext:
    """Build the receiver's TLS context.

    Parameters
    ----------
    certificate_file, private_key_file
        The listener's PEM certificate (chain) and its unencrypted PEM private key.
    ca_file
        PEM CA certificates. When given, callers must present a certificate signed by one
        of them (mutual TLS); when None, callers are not asked for a certificate.

    Raises
    ------
    TLSConfigError
        When a file is missing or cannot be loaded; the message names the `[node]` key.
    """
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_TLS_VERSION
    _load_certificate_chain(context, certificate_file, private_key_file, "[node]")
    if ca_file is not None:
        _load_ca_bundle(context, ca_file, "[node]")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca_file: Path | None,
    certificate_file: Path | None = None,
    private_key_file: Path | None = None,
    section: str = "[[destinations]]",
) -> ssl.SSLContext:
    """Build a sender's TLS context, which verifies the peer's certificate and host name.

    Parameters
    ----------
    ca_file
        PEM CA certificates that may sign the peer's certificate; None uses the system's
        default trust store.
    certificate_file, private_key_file
        The node's client certificate and key, for peers that require mutual TLS.
    section
        The configuration section named in error messages.

    Raises
    ------
    TLSConfigError
        When a file is missing or cannot be loaded; the message names the key.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MINIMUM_TLS_VERSION
    # PROTOCOL_TLS_CLIENT already sets both; they are set again so that no later edit drops them.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if ca_file is not None:
        _load_ca_bundle(context, ca_file, section)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if certificate_file is not None and private_key_file is not None:
        _load_certificate_chain(context, certificate_file, private_key_file, section)
    return context


class _HandshakeRecordingSocket(ssl.SSLSocket):
    """An SSL socket that stores its handshake error on its context.

    pynetdicom 3.0 logs a failed client handshake but returns only an unestablished
    association, so the sender reads the cause from the context afterwards.
    """

    def do_handshake(self, block=False):
        try:
            super().do_handshake(block)
        except (ssl.SSLError, OSError) as exc:
            self.context.handshake_error = str(exc) or type(exc).__name__
            raise


def peer_context(peer: DestinationSettings | QuerySourceSettings) -> ssl.SSLContext:
    """Build a fresh client context for one association with a TLS destination or query source.

    The files are read on every call, so renewed certificates take effect without a
    restart. After a failed association, the context's `handshake_error` attribute contains
    the TLS error text, or "" when the handshake was not the cause.

    Raises
    ------
    TLSConfigError
        When a file is missing or cannot be loaded; the message names the destination or
        query source.
    """
    kind = "query source" if isinstance(peer, QuerySourceSettings) else "destination"
    context = client_context(
        peer.tls_ca_file,
        peer.tls_certificate_file,
        peer.tls_private_key_file,
        section=f"{kind} {peer.name!r}:",
    )
    context.sslsocket_class = _HandshakeRecordingSocket
    context.handshake_error = ""
    return context


def complete_server_handshake(sock: socket.socket, timeout_seconds: float) -> TLSSession:
    """Run the TLS handshake of an accepted connection and return its parameters.

    The socket's previous timeout is restored afterwards.

    Raises
    ------
    TLSHandshakeError
        When the peer does not speak TLS, offers only protocol versions older than TLS 1.2,
        presents no or an untrusted certificate where one is required, or does not finish
        within `timeout_seconds`.
    """
    if not isinstance(sock, ssl.SSLSocket):
        raise TLSHandshakeError(f"the connection is not a TLS socket but {type(sock).__name__}")
    previous_timeout = sock.gettimeout()
    sock.settimeout(timeout_seconds)
    try:
        sock.do_handshake()
    except (ssl.SSLError, OSError) as exc:
        raise TLSHandshakeError(str(exc) or type(exc).__name__) from exc
    finally:
        try:
            sock.settimeout(previous_timeout)
        except OSError:
            pass
    cipher = sock.cipher()
    return TLSSession(
        tls_version=sock.version() or "",
        cipher=cipher[0] if cipher else "",
        peer_certificate_subject=_subject_text(sock.getpeercert()),
    )


def _subject_text(certificate: dict | None) -> str:
    if not certificate:
        return ""
    parts = []
    for relative_name in certificate.get("subject", ()):
        for attribute, value in relative_name:
            parts.append(f"{attribute}={value}")
    return ",".join(parts)

