"""TLS / mutual TLS for every gRPC link, and bearer-token authentication for the coordinator's public API.

Plain (insecure) stays the default. Two sides, configured by flags with environment fallbacks:

- a *server* (every service) serves TLS with `--tls-cert/--tls-key`; with `--tls-client-ca` it also
  REQUIRES a client certificate signed by that CA (mutual TLS), so only holders of such a certificate (the
  coordinator) can call it at all;
- a *client* of a service (the coordinator towards workers and router, the gateway and `r2r generate`
  towards the coordinator) uses TLS when `--tls-ca` (the CA that signed the servers' certificates) or
  `--tls` (system roots) is given, and presents `--tls-client-cert/--tls-client-key` for mutual TLS.

The coordinator can require `authorization: Bearer <token>` metadata on its public API (`--auth-token`,
`--auth-token-file`): `BearerTokenInterceptor` answers UNAUTHENTICATED otherwise; health checks and
reflection stay open so probes keep working. Tokens are compared in constant time and never logged;
certificate and key *paths* are logged, their contents never.

`generate_dev_certs` writes a throwaway CA plus loopback server and client certificates (`r2r serve
--tls-dir`, tests).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import grpc

from r2r_serve.common.logging import get_logger

log = get_logger(__name__)

# Methods reachable without a token: probes (grpc.health.v1) and service discovery (reflection).
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                        "/grpc.reflection.v1.ServerReflection/")

ENV = {  # flag dest -> environment variable used when the flag is not given
    "tls_cert": "R2R_TLS_CERT", "tls_key": "R2R_TLS_KEY", "tls_client_ca": "R2R_TLS_CLIENT_CA",
    "tls_ca": "R2R_TLS_CA", "tls_client_cert": "R2R_TLS_CLIENT_CERT", "tls_client_key": "R2R_TLS_CLIENT_KEY",
    "tls_server_name": "R2R_TLS_SERVER_NAME", "tls": "R2R_TLS",
    "auth_token": "R2R_AUTH_TOKEN", "auth_token_file": "R2R_AUTH_TOKEN_FILE", "token": "R2R_TOKEN",
}


def _env(dest: str) -> str | None:
    return os.environ.get(ENV[dest]) or None


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


class SecurityConfigError(ValueError):
    """A TLS or token setting that cannot work (missing file, half a key pair, bad token)."""


# ---- server side ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerTLS:
    """TLS for a listening port. With `client_ca`, clients must present a certificate signed by it (mTLS)."""

    cert: str
    key: str
    client_ca: str | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        ca = _read(self.client_ca, "client CA certificate") if self.client_ca else None
        return grpc.ssl_server_credentials([(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))],
                                           root_certificates=ca, require_client_auth=ca is not None)

    def describe(self) -> dict:
        """Paths only (for logs)."""
        return {"tls_cert": str(self.cert), "tls_client_ca": str(self.client_ca) if self.client_ca else None,
                "mtls": self.mutual}


def server_tls(cert: str | None = None, key: str | None = None, client_ca: str | None = None) -> ServerTLS | None:
    """A ServerTLS from paths, or None (plain) when none is given. Checks the files are readable now."""
    if not (cert or key or client_ca):
        return None
    if not (cert and key):
        raise SecurityConfigError("TLS needs both a certificate and its key (--tls-cert and --tls-key)"
                                  + ("; --tls-client-ca alone cannot turn on mutual TLS" if client_ca else ""))
    for path, what in ((cert, "TLS certificate"), (key, "TLS key"), (client_ca, "client CA certificate")):
        if path:
            _read(path, what)
    return ServerTLS(str(cert), str(key), str(client_ca) if client_ca else None)


def add_server_tls_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS (this service's port)")
    g.add_argument("--tls-cert", default=_env("tls_cert"), metavar="PEM",
                   help="serve TLS with this certificate (chain) [env R2R_TLS_CERT]")
    g.add_argument("--tls-key", default=_env("tls_key"), metavar="PEM", help="its private key [env R2R_TLS_KEY]")
    g.add_argument("--tls-client-ca", default=_env("tls_client_ca"), metavar="PEM",
                   help="require client certificates signed by this CA (mutual TLS) [env R2R_TLS_CLIENT_CA]")


def server_tls_from_args(args: argparse.Namespace) -> ServerTLS | None:
    return server_tls(args.tls_cert, args.tls_key, args.tls_client_ca)


# ---- client side ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientTLS:
    """TLS for channels to other services. `ca` = None uses the system's roots; `cert`/`key` = the client
    certificate for mTLS; `server_name` overrides the name checked in the server's certificate."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA certificate") if self.ca else None,
            private_key=_read(self.key, "client key") if self.key else None,
            certificate_chain=_read(self.cert, "client certificate") if self.cert else None)

    def options(self) -> list[tuple[str, str]]:
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name), ("grpc.default_authority", self.server_name)]

    def describe(self) -> dict:
        return {"tls_ca": str(self.ca) if self.ca else "system", "tls_client_cert": self.cert,
                "tls_server_name": self.server_name}


def client_tls(ca: str | None = None, cert: str | None = None, key: str | None = None,
               server_name: str | None = None, enabled: bool = False) -> ClientTLS | None:
    """A ClientTLS, or None (plain) when nothing asks for TLS."""
    if not (enabled or ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise SecurityConfigError("a client certificate needs its key: give both --tls-client-cert and "
                                  "--tls-client-key")
    for path, what in ((ca, "CA certificate"), (cert, "client certificate"), (key, "client key")):
        if path:
            _read(path, what)
    return ClientTLS(str(ca) if ca else None, str(cert) if cert else None, str(key) if key else None,
                     server_name or None)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def add_client_tls_args(p: argparse.ArgumentParser, peer: str = "the services this one calls",
                        short_cert_names: bool = False) -> None:
    """`short_cert_names`: also accept --tls-cert/--tls-key for the client certificate (pure clients such as
    `r2r generate`, which serve nothing)."""
    g = p.add_argument_group(f"TLS (channels to {peer})")
    cert_names = ["--tls-client-cert", "--tls-cert"] if short_cert_names else ["--tls-client-cert"]
    key_names = ["--tls-client-key", "--tls-key"] if short_cert_names else ["--tls-client-key"]
    g.add_argument("--tls", action="store_true", default=_truthy(_env("tls")),
                   help="use TLS, verifying servers against the system's CAs [env R2R_TLS=1]")
    g.add_argument("--tls-ca", default=_env("tls_ca"), metavar="PEM",
                   help="use TLS, verifying servers against this CA certificate [env R2R_TLS_CA]")
    g.add_argument(*cert_names, dest="tls_client_cert", default=_env("tls_client_cert"), metavar="PEM",
                   help="present this client certificate (mutual TLS) [env R2R_TLS_CLIENT_CERT]")
    g.add_argument(*key_names, dest="tls_client_key", default=_env("tls_client_key"), metavar="PEM",
                   help="the client certificate's key [env R2R_TLS_CLIENT_KEY]")
    g.add_argument("--tls-server-name", default=_env("tls_server_name"), metavar="NAME",
                   help="expect this name in server certificates instead of the host dialled "
                        "[env R2R_TLS_SERVER_NAME]")


def client_tls_from_args(args: argparse.Namespace) -> ClientTLS | None:
    return client_tls(args.tls_ca, args.tls_client_cert, args.tls_client_key, args.tls_server_name,
                      enabled=args.tls)


def aio_channel(target: str, tls: ClientTLS | None, options: Sequence[tuple] = ()) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


def sync_channel(target: str, tls: ClientTLS | None, options: Sequence[tuple] = ()) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


# ---- bearer tokens ----------------------------------------------------------------------------------

def _check_token(token: str, origin: str) -> str:
    if not token or any(c.isspace() for c in token) or not token.isascii() or not token.isprintable():
        raise SecurityConfigError(f"a token from {origin} is empty or has spaces or non-ASCII characters")
    return token


def load_tokens(token: str | None = None, token_file: str | None = None) -> list[str]:
    """Accepted tokens: `token` plus one per line of `token_file` (blank lines and # comments skipped)."""
    tokens = [_check_token(token.strip(), "--auth-token")] if token and token.strip() else []
    if token_file:
        for line in _read(token_file, "token file").decode("utf-8", errors="strict").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(_check_token(line, f"the token file {token_file}"))
        if not tokens:
            raise SecurityConfigError(f"the token file {token_file} holds no token")
    return tokens


def add_auth_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("authentication (public API)")
    g.add_argument("--auth-token", default=_env("auth_token"), metavar="TOKEN",
                   help="require 'authorization: Bearer TOKEN' on every call except health and reflection "
                        "[env R2R_AUTH_TOKEN; prefer the env or a file: flags show in ps]")
    g.add_argument("--auth-token-file", default=_env("auth_token_file"), metavar="FILE",
                   help="accept any token in this file (one a line, # comments) [env R2R_AUTH_TOKEN_FILE]")


def tokens_from_args(args: argparse.Namespace) -> list[str]:
    return load_tokens(args.auth_token, args.auth_token_file)


def _digest(token: bytes) -> bytes:
    # Compare fixed-size digests so that neither the value nor the length of a token leaks through timing.
    return hashlib.sha256(token).digest()


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls without a valid `authorization: Bearer <token>` with UNAUTHENTICATED (health and
    reflection stay open). Logs the method and the reason, never what was presented."""

    MISSING = ("this server requires authentication: send the metadata 'authorization: Bearer <token>' "
               "(SDK: token=...; r2r generate --token or R2R_TOKEN; OpenAI clients: the API key)")
    MALFORMED = "the authorization metadata must be 'Bearer <token>'"
    REJECTED = "the bearer token was not accepted"

    def __init__(self, tokens: Iterable[str], open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES):
        self._digests = [_digest(t.encode()) for t in tokens]
        if not self._digests:
            raise SecurityConfigError("BearerTokenInterceptor needs at least one token")
        self._open = tuple(open_prefixes)

    def check(self, metadata) -> str | None:
        """None when `metadata` carries an accepted token, else the reason (a message for the caller)."""
        values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
        if not values:
            return self.MISSING
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, presented = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return self.MALFORMED
        digest = _digest(presented.strip().encode("utf-8", errors="replace"))
        ok = False
        for known in self._digests:  # no early exit: the time does not depend on which token matched
            ok |= hmac.compare_digest(digest, known)
        return None if ok else self.REJECTED

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        reason = self.check(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if reason is None or handler is None:
            return handler
        log.warning("unauthenticated", method=method,
                    reason={self.MISSING: "missing", self.MALFORMED: "malformed"}.get(reason, "rejected"))
        return _denying_handler(handler, reason)


def _denying_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    return grpc.stream_stream_rpc_method_handler(deny, **kw)


# ---- throwaway certificates (r2r serve --tls-dir, tests) -----------------------------------------------

@dataclass(frozen=True)
class DevCerts:
    """Paths of a throwaway CA and the loopback server / client certificates it signed."""

    dir: Path

    ca = property(lambda self: self.dir / "ca.pem")
    server_cert = property(lambda self: self.dir / "server.pem")
    server_key = property(lambda self: self.dir / "server.key")
    client_cert = property(lambda self: self.dir / "client.pem")
    client_key = property(lambda self: self.dir / "client.key")

    def files(self) -> list[Path]:
        return [self.ca, self.server_cert, self.server_key, self.client_cert, self.client_key]

    def server(self, mutual: bool = True) -> ServerTLS:
        return ServerTLS(str(self.server_cert), str(self.server_key), str(self.ca) if mutual else None)

    def client(self, with_cert: bool = True, server_name: str | None = None) -> ClientTLS:
        return ClientTLS(str(self.ca), str(self.client_cert) if with_cert else None,
                         str(self.client_key) if with_cert else None, server_name)


def _valid(path: Path, margin: datetime.timedelta) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc) + margin


def generate_dev_certs(directory: str | os.PathLike, hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
                       days: int = 365, force: bool = False) -> DevCerts:
    """Write ca.pem, server.pem/.key (SANs = `hosts`) and client.pem/.key into `directory`, unless a complete,
    unexpired set is already there. The CA's key is not kept: to add a certificate, make a new set. Keys are
    EC P-256, written 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = DevCerts(Path(directory))
    if not force and all(p.exists() for p in out.files()) and all(
            _valid(p, datetime.timedelta(days=1)) for p in (out.ca, out.server_cert, out.client_cert)):
        return out
    out.dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "r2r-serve (throwaway)"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("r2r-serve throwaway CA")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))

    def issue(cn: str, usage, sans: list[x509.GeneralName]):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(until)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key, server_cert = issue("r2r-serve server", ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_key, client_cert = issue("r2r-serve coordinator", ExtendedKeyUsageOID.CLIENT_AUTH, [])

    def write(path: Path, data: bytes, private: bool = False) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    pem = serialization.Encoding.PEM
    for key, path in ((server_key, out.server_key), (client_key, out.client_key)):
        write(path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), True)
    for cert, path in ((ca_cert, out.ca), (server_cert, out.server_cert), (client_cert, out.client_cert)):
        write(path, cert.public_bytes(pem))
    log.info("dev_certs_written", dir=str(out.dir), hosts=list(hosts), days=days)
    return out
