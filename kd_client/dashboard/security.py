"""Who may change anything through the dashboard, and how a forged request is told apart.

A state-changing action (rollback, cancel) is a POST that passes three checks:
1. the dashboard token: `KD_DASHBOARD_TOKEN` must be set (otherwise actions are disabled) and the
   form must carry it (compared in constant time);
2. a CSRF token: OWASP's "HMAC-based token" pattern, without a session. The page that shows the
   form embeds `issued_at.HMAC-SHA256(secret, issued_at:action)`; the secret is random per
   dashboard process, and `action` names the operation and its target (`rollback:memory`,
   `cancel:kd-memory-...`), so a token is good for that one action, for `max_age_s`. Another
   site cannot read our pages (same-origin policy, no CORS), so it cannot obtain one;
3. the request's own origin headers: a browser's `Sec-Fetch-Site` must be same-origin and an
   `Origin` header must name this host.
Hosts are checked too (Starlette's TrustedHostMiddleware, in app.py) against DNS rebinding.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlparse

from pydantic import SecretStr


class CsrfTokens:
    """Issue and check per-action CSRF tokens signed with a per-process secret."""

    def __init__(self, secret: bytes, max_age_s: float = 4 * 3600, clock: Callable[[], float] = time.time):
        if len(secret) < 16:
            raise ValueError("the CSRF secret must be at least 16 random bytes")
        self._secret, self.max_age_s, self._clock = secret, max_age_s, clock

    def _sign(self, issued: int, action: str) -> str:
        return hmac.new(self._secret, f"{issued}:{action}".encode(), hashlib.sha256).hexdigest()

    def issue(self, action: str) -> str:
        issued = int(self._clock())
        return f"{issued}.{self._sign(issued, action)}"

    def valid(self, token: str, action: str) -> bool:
        stamp, _, mac = (token or "").partition(".")
        if not stamp.isdigit() or not mac:
            return False
        issued = int(stamp)
        if not 0 <= self._clock() - issued <= self.max_age_s:
            return False
        return hmac.compare_digest(mac, self._sign(issued, action))


def token_matches(expected: SecretStr | None, given: str | None) -> bool:
    """The dashboard token, compared in constant time; never matches when none is configured."""
    if expected is None or not given:
        return False
    return hmac.compare_digest(expected.get_secret_value().encode(), given.encode())


def same_origin(headers: Mapping[str, str]) -> bool:
    """False when the browser says the request came from another site."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is None:
        return True  # not a browser form post from elsewhere (those carry Origin); the tokens still apply
    return origin != "null" and urlparse(origin).netloc == headers.get("host", "")


def refusal(configured: SecretStr | None, given: str | None, csrf_ok: bool, headers: Mapping[str, str]) -> str | None:
    """Why an action is refused (None: allowed). The order tells an operator what to fix first."""
    if configured is None:
        return "actions are disabled: start `kd-client dashboard` with KD_DASHBOARD_TOKEN set"
    if not same_origin(headers):
        return "refused: the request came from another site"
    if not csrf_ok:
        return "refused: the form is expired or was not issued by this dashboard; reload the page and try again"
    if not token_matches(configured, given):
        return "refused: wrong or missing dashboard token"
    return None


def is_loopback(host: str) -> bool:
    """Whether a bind host is this machine only (the dashboard's and `kd-client serve`'s default)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str) -> list[str]:
    """Host headers the app answers: loopback names, plus the bound address; '*' on a wildcard bind."""
    if bind_host in ("0.0.0.0", "::", ""):
        return ["*"]
    return sorted({"127.0.0.1", "localhost", "::1", "[::1]", bind_host})
