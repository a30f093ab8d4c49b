"""SSLContext builders: TLS 1.2 minimum, BCP 195 cipher suites, mutual authentication when a CA is given.

Imports: config (types only), stdlib ssl.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from gateway.config import ClientTls, ServerTls

# DICOM's BCP 195 TLS profile (PS3.15 B.9): AEAD suites with forward secrecy for TLS 1.2; TLS 1.3 suites
# are OpenSSL's defaults, all of which the profile admits.
BCP195_CIPHERS: Final = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def server_context(settings: ServerTls) -> ssl.SSLContext:
    """For the receiver: our certificate; with a CA, every client must present one that it signed."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(settings.cert, settings.key)
    if settings.ca is not None:
        context.load_verify_locations(cafile=settings.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(settings: ClientTls) -> ssl.SSLContext:
    """For a destination: verify the server against the CA (or the system store) and its host name."""
    context = _harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.ca))
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if settings.cert is not None and settings.key is not None:
        context.load_cert_chain(settings.cert, settings.key)
    return context
