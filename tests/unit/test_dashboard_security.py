"""The dashboard's action checks: token, per-action CSRF tokens, origin headers, hosts."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from kd_client.dashboard.security import CsrfTokens, allowed_hosts, is_loopback, refusal, same_origin, token_matches

SECRET = b"0123456789abcdef0123456789abcdef"
TOKEN = SecretStr("a-long-dashboard-token")
SAME = {"host": "127.0.0.1:8741", "origin": "http://127.0.0.1:8741", "sec-fetch-site": "same-origin"}


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_csrf_token_is_good_for_its_own_action_only():
    csrf = CsrfTokens(SECRET)
    tok = csrf.issue("rollback:memory")
    assert csrf.valid(tok, "rollback:memory")
    assert not csrf.valid(tok, "rollback:debug") and not csrf.valid(tok, "cancel:kd-memory-" + "0" * 20)
    assert not CsrfTokens(b"another-secret-of-32-bytes......").valid(tok, "rollback:memory")


@pytest.mark.parametrize("token", ["", "abc", "123", "123.", ".abc", "x1.abc", "1.zz"])
def test_malformed_csrf_tokens_are_refused(token):
    assert not CsrfTokens(SECRET).valid(token, "rollback:memory")


def test_a_tampered_or_re_dated_csrf_token_is_refused():
    clock = Clock()
    csrf = CsrfTokens(SECRET, clock=clock)
    stamp, mac = csrf.issue("a").split(".")
    flipped = mac[:-1] + ("0" if mac[-1] != "0" else "1")
    assert not csrf.valid(f"{stamp}.{flipped}", "a")
    assert not csrf.valid(f"{int(stamp) + 1}.{mac}", "a")  # the time is signed too


def test_csrf_tokens_expire_and_future_ones_are_refused():
    clock = Clock()
    csrf = CsrfTokens(SECRET, max_age_s=60, clock=clock)
    tok = csrf.issue("a")
    clock.now += 60
    assert csrf.valid(tok, "a")
    clock.now += 1
    assert not csrf.valid(tok, "a")
    clock.now -= 1000  # issued "in the future" relative to the clock
    assert not csrf.valid(tok, "a")


def test_a_short_secret_is_refused():
    with pytest.raises(ValueError):
        CsrfTokens(b"short")


def test_the_dashboard_token_never_matches_when_none_is_configured():
    assert token_matches(TOKEN, "a-long-dashboard-token")
    assert not token_matches(TOKEN, "a-long-dashboard-tokeN") and not token_matches(TOKEN, "")
    assert not token_matches(TOKEN, None) and not token_matches(None, "anything") and not token_matches(None, "")


@pytest.mark.parametrize(
    "headers, ok",
    [
        (SAME, True),
        ({"host": "127.0.0.1:8741"}, True),  # no browser origin headers (curl): the tokens still apply
        ({**SAME, "sec-fetch-site": "cross-site"}, False),
        ({**SAME, "sec-fetch-site": "same-site"}, False),
        ({**SAME, "origin": "http://evil.example"}, False),
        ({**SAME, "origin": "http://127.0.0.1:9999"}, False),
        ({**SAME, "origin": "null"}, False),
    ],
)
def test_requests_from_other_sites_are_told_apart(headers, ok):
    assert same_origin(headers) is ok


def test_refusal_says_what_to_fix_first():
    assert "disabled" in refusal(None, "a-long-dashboard-token", True, SAME)
    assert "another site" in refusal(TOKEN, "a-long-dashboard-token", True, {**SAME, "origin": "http://x"})
    assert "expired" in refusal(TOKEN, "a-long-dashboard-token", False, SAME)
    assert "wrong or missing" in refusal(TOKEN, "nope", True, SAME)
    assert refusal(TOKEN, "a-long-dashboard-token", True, SAME) is None


def test_hosts_answered_are_loopback_unless_bound_wider():
    assert set(allowed_hosts("127.0.0.1")) >= {"127.0.0.1", "localhost"} and "*" not in allowed_hosts("127.0.0.1")
    assert "10.0.0.5" in allowed_hosts("10.0.0.5")
    assert allowed_hosts("0.0.0.0") == ["*"]
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.com")
