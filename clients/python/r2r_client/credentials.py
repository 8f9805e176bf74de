"""TLS credentials and bearer-token metadata for the SDK clients."""

from __future__ import annotations

import grpc


def _pem(source) -> bytes | None:
    """A path to a PEM file (str or PathLike), or the PEM bytes themselves."""
    if source is None:
        return None
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


def channel_credentials(credentials: grpc.ChannelCredentials | None = None, *, tls: bool = False,
                        tls_ca=None, tls_client_cert=None, tls_client_key=None) -> grpc.ChannelCredentials | None:
    """Credentials for the coordinator channel: `credentials` as given, else TLS when `tls`, `tls_ca` (CA that
    signed the server's certificate; None = system roots) or a client certificate is given, else None (plain)."""
    if credentials is not None:
        return credentials
    if not (tls or tls_ca or tls_client_cert or tls_client_key):
        return None
    if (tls_client_cert is None) != (tls_client_key is None):
        raise ValueError("a client certificate needs its key: give both tls_client_cert and tls_client_key")
    return grpc.ssl_channel_credentials(root_certificates=_pem(tls_ca), private_key=_pem(tls_client_key),
                                        certificate_chain=_pem(tls_client_cert))


def channel_options(base: list[tuple], tls_server_name: str | None) -> list[tuple]:
    if not tls_server_name:
        return list(base)
    return [*base, ("grpc.ssl_target_name_override", tls_server_name), ("grpc.default_authority", tls_server_name)]


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """`authorization: Bearer <token>` call metadata (None without a token)."""
    return (("authorization", f"Bearer {token}"),) if token else None
