"""Connection authentication for the gateway.

The engine hands Python a :class:`ConnectRequest` for every WebSocket upgrade.
:class:`Authenticator` turns it into an :class:`Identity` (or raises
:class:`AuthError`, which the engine turns into an HTTP ``401``/``403`` refusal of the
upgrade) and picks the ``Sec-WebSocket-Protocol`` to echo.

Tokens are JWTs verified with PyJWT. Keys are loaded once, when the
:class:`Authenticator` is built; ``authenticate`` does no I/O.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import parse_qsl

import jwt

from .errors import AuthError, ConfigError

__all__ = [
    "ALGORITHMS",
    "EMPTY_META",
    "AuthConfig",
    "AuthError",
    "Authenticator",
    "ConfigError",
    "ConnectRequest",
    "Identity",
    "mint_token",
]

log = logging.getLogger("gateway.auth")

HMAC_ALGORITHMS: frozenset[str] = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS: frozenset[str] = frozenset({"RS256", "RS384", "RS512"})
EC_ALGORITHMS: frozenset[str] = frozenset({"ES256"})
#: Every algorithm ``auth.algorithms`` may name. ``none`` is never accepted.
ALGORITHMS: frozenset[str] = HMAC_ALGORITHMS | RSA_ALGORITHMS | EC_ALGORITHMS
_MIN_HMAC_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MODES = ("jwt", "dev")
_MAX_DEV_USER = 128


@dataclass
class AuthConfig:
    """The ``auth`` section of the gateway configuration.

    ``mode="jwt"`` verifies tokens; ``mode="dev"`` trusts ``?user=<id>`` and must only be
    used for demos and benchmarks. Call :meth:`check` after loading.
    """

    mode: str = "jwt"
    algorithms: list[str] = field(default_factory=lambda: ["HS256"])
    secret: str | None = None
    public_key: str | None = None
    public_key_file: str | None = None
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 0.0
    user_claim: str = "sub"
    rooms_claim: str = "rooms"
    meta_claims: list[str] = field(default_factory=lambda: ["name", "role"])
    allow_guests: bool = False
    query_param: str = "token"
    header: str = "authorization"
    protocol_prefix: str = "token."
    #: Seconds an upgrade may wait for the connect decision (the engine answers 503 after).
    deadline: float = field(default=5.0, metadata={"engine": True})
    #: ``dev`` mode on a non-loopback ``server.host``: refused unless this is true.
    dev_allow_remote: bool = False

    def check(self, prefix: str = "auth") -> None:
        """Validate the settings; raise :class:`ConfigError` naming ``<prefix>.<field>``.

        In ``jwt`` mode this also parses the public key (from ``public_key`` or
        ``public_key_file``) so that a bad PEM fails at startup. Logs a warning for
        ``dev`` mode and for HMAC secrets shorter than the RFC 7518 minimum.
        """
        if self.mode not in _MODES:
            raise ConfigError(f"{prefix}.mode", f"must be one of {', '.join(_MODES)}, got {self.mode!r}")
        if not isinstance(self.algorithms, (list, tuple)) or not self.algorithms:
            raise ConfigError(f"{prefix}.algorithms", "must be a non-empty list")
        for alg in self.algorithms:
            if alg not in ALGORITHMS:
                raise ConfigError(
                    f"{prefix}.algorithms",
                    f"unsupported algorithm {alg!r} (allowed: {', '.join(sorted(ALGORITHMS))})",
                )
        if not isinstance(self.leeway, (int, float)) or self.leeway < 0:
            raise ConfigError(f"{prefix}.leeway", "must be a number >= 0")
        if not isinstance(self.deadline, (int, float)) or self.deadline <= 0:
            raise ConfigError(f"{prefix}.deadline", "must be a number > 0")
        for name in ("user_claim", "rooms_claim", "query_param", "header", "protocol_prefix"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{prefix}.{name}", "must be a non-empty string")
        if not isinstance(self.meta_claims, (list, tuple)) or not all(
            isinstance(c, str) and c for c in self.meta_claims
        ):
            raise ConfigError(f"{prefix}.meta_claims", "must be a list of non-empty strings")
        if self.mode == "dev":
            log.warning(
                "%s.mode = 'dev': users are NOT authenticated (?user=<id> is trusted); "
                "use only for demos and benchmarks",
                prefix,
            )
            return
        algs = set(self.algorithms)
        hmac = algs & HMAC_ALGORITHMS
        if hmac:
            if not isinstance(self.secret, str) or not self.secret:
                raise ConfigError(f"{prefix}.secret", f"required for {', '.join(sorted(hmac))}")
            need = max(_MIN_HMAC_BYTES[a] for a in hmac)
            weak = weak_secret(self.secret, need)
            if weak:
                raise ConfigError(f"{prefix}.secret", f"{weak}; use at least {need} random bytes, e.g. $(openssl rand -base64 {need + need // 2})")
        if algs - HMAC_ALGORITHMS:
            _load_public_key(self, prefix)


#: Words that mark a secret copied from an example or left as a placeholder.
_PLACEHOLDER_WORDS = ("changeme", "replaceme", "yoursecret", "placeholder", "xxxx")


def weak_secret(secret: str, need: int) -> str | None:
    """Why ``secret`` must not sign tokens, or None: shorter than ``need`` bytes (RFC 7518),
    a placeholder (``change-me...``, ``your-secret...``), or too few distinct characters."""
    raw = secret.encode()
    if len(raw) < need:
        return f"shorter than {need} bytes"
    low = "".join(ch for ch in secret.lower() if ch.isalnum())
    for word in _PLACEHOLDER_WORDS:
        if word in low:
            return f"looks like a placeholder (contains {word!r})"
    if len(set(raw)) < 10:
        return "too few distinct characters to be random"
    return None


def _load_public_key(cfg: AuthConfig, prefix: str) -> Any:
    """Load and type-check the PEM public key (or certificate) for RS*/ES* algorithms."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    algs = set(cfg.algorithms) - HMAC_ALGORITHMS
    if cfg.public_key and cfg.public_key_file:
        raise ConfigError(f"{prefix}.public_key", "set either public_key or public_key_file, not both")
    if cfg.public_key:
        key_name, pem = f"{prefix}.public_key", cfg.public_key.encode()
    elif cfg.public_key_file:
        key_name = f"{prefix}.public_key_file"
        try:
            with open(cfg.public_key_file, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise ConfigError(key_name, f"cannot read {cfg.public_key_file!r}: {e.strerror}") from None
    else:
        raise ConfigError(f"{prefix}.public_key", f"required for {', '.join(sorted(algs))}")
    key: Any
    try:
        key = x509.load_pem_x509_certificate(pem).public_key() if b"-----BEGIN CERTIFICATE-----" in pem else load_pem_public_key(pem)
    except ValueError:
        raise ConfigError(key_name, "not a valid PEM public key or certificate") from None
    if algs & RSA_ALGORITHMS:
        if not isinstance(key, rsa.RSAPublicKey):
            raise ConfigError(key_name, f"{', '.join(sorted(algs & RSA_ALGORITHMS))} need an RSA key")
        if key.key_size < 2048:
            log.warning("%s: RSA key has only %d bits", key_name, key.key_size)
    if algs & EC_ALGORITHMS and (not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1)):
        raise ConfigError(key_name, "ES256 needs an EC P-256 key")
    return key


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What the engine hands Python for each WebSocket upgrade request.

    ``query`` is the raw query string without ``?``; header names are lower-cased;
    ``protocols`` are the offered ``Sec-WebSocket-Protocol`` entries, in order.
    ``peer`` is the client's ``ip:port``: the TCP peer, or behind a proxy the address from
    its PROXY protocol header (``server.proxy_protocol``) or, when the peer is in
    ``server.trusted_proxies``, from ``X-Forwarded-For`` / ``X-Real-IP`` (port 0: the
    headers carry none). Per-IP limits and logs use the same address.
    """

    conn: int
    peer: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...] = ()
    protocols: tuple[str, ...] = ()
    _qp: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False, hash=False)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def query_params(self) -> dict[str, str]:
        """The decoded query parameters (parsed once, cached; first occurrence wins).

        Do not mutate the returned dict.
        """
        qp = self._qp
        if qp is None:
            qp = {}
            if self.query:
                for k, v in parse_qsl(self.query, keep_blank_values=True):
                    qp.setdefault(k, v)
            object.__setattr__(self, "_qp", qp)
        return qp


class _EmptyMeta(dict):  # type: ignore[type-arg]
    """The ``meta`` of identities without meta claims: one shared, read-only empty dict
    (saves a dict per connection). Mutating it raises ``TypeError``; to add fields,
    return a new :class:`Identity` from ``on_connect``
    (``dataclasses.replace(identity, meta={**identity.meta, "role": "vip"})``)."""

    __slots__ = ()

    def _readonly(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("this identity's meta is a shared read-only empty dict: return a new Identity with its own meta")

    __setitem__ = __delitem__ = __ior__ = _readonly
    setdefault = update = pop = popitem = clear = _readonly

    def __copy__(self) -> dict[str, Any]:
        return {}

    def __deepcopy__(self, memo: Any) -> dict[str, Any]:
        return {}

    def __reduce__(self) -> Any:
        return (dict, ())

    def __repr__(self) -> str:
        return "{}"


#: Shared by every identity the authenticator builds without meta claims.
EMPTY_META: dict[str, Any] = _EmptyMeta()


@dataclass(slots=True)
class Identity:
    """The authenticated user of one connection.

    ``rooms`` holds the room patterns from the token's rooms claim (``None`` when the
    token has none); ``meta`` holds the configured ``meta_claims`` (e.g. ``name``,
    ``role``); ``expires_at`` is the token's ``exp`` (Unix seconds) if any.
    """

    user: str
    meta: dict[str, Any] = field(default_factory=dict)
    rooms: tuple[str, ...] | None = None
    guest: bool = False
    expires_at: float | None = None

    def may_join(self, room: str) -> bool:
        """Whether the rooms claim allows ``room``; always ``True`` when ``rooms`` is ``None``.

        Patterns are exact names or fnmatch-style globs (``"live:*"``, ``"cs:7?"``);
        ``*`` also matches ``:``.
        """
        rooms = self.rooms
        if rooms is None:
            return True
        for p in rooms:
            if p == room:
                return True
            if "*" in p or "?" in p or "[" in p:
                star = p.find("*")
                if star == len(p) - 1 and "?" not in p and "[" not in p:
                    if room.startswith(p[:-1]):
                        return True
                elif fnmatchcase(room, p):
                    return True
        return False


_guest_ids = itertools.count(1)

# PyJWT exception -> client-safe reason (checked in order; subclasses first).
_JWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "invalid token audience"),
    (jwt.InvalidIssuerError, "invalid token issuer"),
    (jwt.InvalidAlgorithmError, "token algorithm not allowed"),
    (jwt.InvalidSignatureError, "invalid token signature"),
    (jwt.MissingRequiredClaimError, "token misses a required claim"),
    (jwt.DecodeError, "malformed token"),
)


class Authenticator:
    """Verifies connect requests according to an :class:`AuthConfig`.

    Build one per configuration (the config is validated and keys are loaded here) and
    call :meth:`authenticate` for every upgrade. Thread-safe.
    """

    def __init__(self, cfg: AuthConfig) -> None:
        """Validate ``cfg`` (raises :class:`ConfigError`) and load the verification keys."""
        cfg.check()
        self.cfg = cfg
        self._dev = cfg.mode == "dev"
        self._query_param = cfg.query_param
        self._header = cfg.header.lower()
        self._prefix = cfg.protocol_prefix
        self._plen = len(cfg.protocol_prefix)
        self._user_claim = cfg.user_claim
        self._rooms_claim = cfg.rooms_claim
        self._meta_claims = tuple(cfg.meta_claims)
        self._keys: dict[str, Any] = {}
        self._single_key: Any = None
        self._algorithms = list(dict.fromkeys(cfg.algorithms))
        if not self._dev:
            pub = _load_public_key(cfg, "auth") if set(self._algorithms) - HMAC_ALGORITHMS else None
            for alg in self._algorithms:
                self._keys[alg] = cfg.secret.encode() if alg in HMAC_ALGORITHMS else pub  # type: ignore[union-attr]
            families = {alg in HMAC_ALGORITHMS for alg in self._algorithms}
            if len(families) == 1:
                self._single_key = self._keys[self._algorithms[0]]
        self._jwt = jwt.PyJWT(options={"verify_sub": False, "verify_jti": False})
        self._decode_kw: dict[str, Any] = {"leeway": cfg.leeway}
        if cfg.audience is not None:
            self._decode_kw["audience"] = cfg.audience
        if cfg.issuer is not None:
            self._decode_kw["issuer"] = cfg.issuer

    def extract_token(self, req: ConnectRequest) -> str | None:
        """Find the token: query parameter, then header (``Bearer <jwt>`` or raw), then a
        ``Sec-WebSocket-Protocol`` entry ``<protocol_prefix><jwt>``. Empty values are skipped."""
        if req.query:
            tok = req.query_params().get(self._query_param)
            if tok:
                return tok
        hv = req.header(self._header)
        if hv:
            hv = hv.strip()
            if hv[:7].lower() == "bearer ":
                hv = hv[7:].strip()
            if hv:
                return hv
        prefix = self._prefix
        for p in req.protocols:
            if p.startswith(prefix) and len(p) > self._plen:
                return p[self._plen :]
        return None

    def authenticate(self, req: ConnectRequest) -> Identity:
        """Return the :class:`Identity` for ``req`` or raise :class:`AuthError` (401).

        ``jwt`` mode: verifies the signature (only the configured algorithms; ``none``
        is never accepted), ``exp``/``nbf``/``iat`` with ``leeway``, ``aud``/``iss`` when
        configured (a token carrying ``aud`` is refused when no audience is configured),
        and requires the user claim to be a non-empty string or an integer (stringified).
        A malformed rooms claim (not a string or list of strings) is refused rather
        than ignored. Without a token the connection becomes a guest
        (``guest:<n>``, ``guest=True``) if ``allow_guests``, else it is refused; a
        token that is present but invalid is always refused.

        ``dev`` mode: the user is the ``user`` query parameter (required unless
        ``allow_guests``); ``meta_claims`` are copied from query parameters of the
        same names. No token is read.
        """
        if self._dev:
            return self._authenticate_dev(req)
        token = self.extract_token(req)
        if token is None:
            if self.cfg.allow_guests:
                return self._guest()
            raise AuthError(401, "missing token")
        claims = self._decode(token)
        user = claims.get(self._user_claim)
        if isinstance(user, str):
            if not user:
                raise AuthError(401, f"token claim {self._user_claim!r} is empty")
        elif isinstance(user, int) and not isinstance(user, bool):
            user = str(user)
        else:
            raise AuthError(401, f"token misses the {self._user_claim!r} claim")
        rooms: tuple[str, ...] | None = None
        rc = claims.get(self._rooms_claim)
        if rc is not None:
            if isinstance(rc, str):
                rooms = (rc,)
            elif isinstance(rc, list) and all(isinstance(r, str) for r in rc):
                rooms = tuple(rc)
            else:
                raise AuthError(401, f"token claim {self._rooms_claim!r} must be a list of strings")
        meta = {k: claims[k] for k in self._meta_claims if k in claims} or EMPTY_META
        exp = claims.get("exp")
        expires_at = float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
        return Identity(user, meta, rooms, False, expires_at)

    def _decode(self, token: str) -> dict[str, Any]:
        key = self._single_key
        try:
            if key is not None:
                return self._jwt.decode(token, key, algorithms=self._algorithms, **self._decode_kw)
            # Mixed HMAC + asymmetric: pick the key by the (still unverified) header alg,
            # and verify with that one algorithm only, so a public key can never be
            # used as an HMAC secret.
            alg = jwt.get_unverified_header(token).get("alg")
            key = self._keys.get(alg) if isinstance(alg, str) else None
            if key is None or not isinstance(alg, str):
                raise AuthError(401, "token algorithm not allowed")
            return self._jwt.decode(token, key, algorithms=[alg], **self._decode_kw)
        except AuthError:
            raise
        except jwt.PyJWTError as e:
            for cls, reason in _JWT_REASONS:
                if isinstance(e, cls):
                    raise AuthError(401, reason) from None
            raise AuthError(401, "invalid token") from None
        except (ValueError, TypeError):  # defensive: odd payloads inside PyJWT/cryptography
            raise AuthError(401, "invalid token") from None

    def _authenticate_dev(self, req: ConnectRequest) -> Identity:
        qp = req.query_params()
        user = qp.get("user")
        if not user:
            if self.cfg.allow_guests:
                return self._guest()
            raise AuthError(401, "missing user (dev mode: ?user=<id>)")
        if len(user) > _MAX_DEV_USER:
            raise AuthError(401, "user id too long")
        meta = {k: qp[k] for k in self._meta_claims if k in qp} or EMPTY_META
        return Identity(user, meta, None, False, None)

    @staticmethod
    def _guest() -> Identity:
        return Identity(f"guest:{next(_guest_ids)}", EMPTY_META, None, True, None)

    def choose_subprotocol(self, req: ConnectRequest, supported: Sequence[str]) -> str | None:
        """The ``Sec-WebSocket-Protocol`` to echo, or ``None`` if the client offered none.

        1. the first offered entry that is in ``supported`` (token entries are skipped);
        2. otherwise, if the client offered anything, an offered entry anyway: the first
           non-token entry, or the first entry if all are token entries. Browsers and
           WeChat mini-programs fail the handshake when they offered protocols and the
           server echoes none, so the gateway never leaves the header out. Non-token
           entries are preferred so the token is not reflected (and logged by proxies)
           unless there is no alternative.
        """
        offered = req.protocols
        if not offered:
            return None
        prefix = self._prefix
        first_plain: str | None = None
        for p in offered:
            if p.startswith(prefix):
                continue
            if p in supported:
                return p
            if first_plain is None:
                first_plain = p
        return first_plain if first_plain is not None else offered[0]


def mint_token(secret: str, sub: str | int, ttl: float | None = 3600, **claims: Any) -> str:
    """Create an HS256 token for tests, the demo and benchmarks.

    Sets ``sub``, ``iat`` and ``exp = now + ttl`` (no ``exp`` when ``ttl`` is ``None``);
    extra keyword claims are added and override those.
    """
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now}
    if ttl is not None:
        payload["exp"] = now + int(ttl)
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")
