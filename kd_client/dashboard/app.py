"""The dashboard's web app: Starlette routes that render kd_client.dashboard.data with Jinja2.

    GET  /                           overview: domains, workers, queues, recent jobs
    GET  /domains/{domain}[?version=N]  versions, loss curves, gate, samples, rollback form
    POST /domains/{domain}/rollback  (token + CSRF) point `current` at another kept version
    GET  /jobs/{job_id}              phase, progress, place in the queue, outcome; cancel form
    GET  /jobs/{job_id}/live         the live part of the job page (polled by static/job.js)
    POST /jobs/{job_id}/cancel       (token + CSRF)
    GET  /static/dashboard.css, /static/job.js   two fixed files of this package

Every path parameter is validated as the CLI validates it (jobs.models.check_domain,
check_job_id); no route reads a file named by a request. Redis calls block, so the GET routes
are plain functions (Starlette runs them in its thread pool).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jinja2
import redis
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.errors import KDError
from jobs.models import check_domain, check_job_id
from kd_client import mirror
from kd_client import queue as Q
from kd_client.dashboard import charts, data
from kd_client.dashboard.security import CsrfTokens, allowed_hosts, refusal
from kd_client.settings import ClientSettings

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",  # no-referrer would make form posts carry `Origin: null`
    "cache-control": "no-store",
}
STATIC = {"dashboard.css": "text/css; charset=utf-8", "job.js": "text/javascript; charset=utf-8"}


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response (pure ASGI: streaming and errors included)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclass
class Dashboard:
    """What every route shares, built once per app (no module-level state)."""

    settings: ClientSettings
    conn: redis.Redis
    csrf: CsrfTokens
    templates: Jinja2Templates
    static: dict[str, bytes]

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        context.update(
            actions=self.settings.dashboard_token is not None,
            redis_url=data.redacted(self.settings.redis_url),
            adapters_dir=str(self.settings.adapters_dir),
        )
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    def message(self, request: Request, status: int, title: str, text: str) -> Response:
        return self.page(request, "message.html", status, title=title, text=text)


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("kd_client.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = _num
    return Jinja2Templates(env=env)


def _num(value: Any, digits: int = 4) -> str:
    """A metric for a table cell: rounded, '-' when missing."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _dash(request: Request) -> Dashboard:
    dash: Dashboard = request.app.state.dashboard
    return dash


def _domain(request: Request) -> str | None:
    try:
        return check_domain(request.path_params["domain"])
    except ValueError:
        return None


def _job_id(request: Request) -> str | None:
    try:
        return check_job_id(request.path_params["job_id"])
    except ValueError:
        return None


# --- pages ---------------------------------------------------------------------------------------
def overview_page(request: Request) -> Response:
    dash = _dash(request)
    view = data.overview(dash.settings.adapters_dir, dash.conn, dash.settings)
    sparks = {d.domain: Markup(charts.sparkline(d.trend)) for d in view.domains}
    return dash.page(request, "overview.html", view=view, sparks=sparks, title="kd-daemon")


def domain_page(request: Request) -> Response:
    dash = _dash(request)
    domain = _domain(request)
    if domain is None:
        return dash.message(request, 404, "No such domain", "Domain names are 1-32 lower-case letters, digits or _.")
    raw = request.query_params.get("version")
    if raw is not None and not raw.isdigit():
        return dash.message(request, 400, "Bad version", "version must be a version number, e.g. ?version=2")
    try:
        view = data.domain_page(dash.settings.adapters_dir, domain, int(raw) if raw else None)
    except KDError as e:
        return dash.message(request, 500, f"{domain}: unreadable", str(e))
    if view is None:
        return dash.message(request, 404, f"Nothing published for {domain}", f"No versions under {domain}/versions.")
    metrics = view.selected.metrics if view.selected else {}
    return dash.page(
        request,
        "domain.html",
        view=view,
        title=f"{domain} - kd-daemon",
        train_chart=Markup(train_chart(metrics)),
        val_chart=Markup(val_chart(metrics)),
        rolled_back=request.query_params.get("rolled_back", ""),
        csrf=dash.csrf.issue(f"rollback:{domain}"),
    )


def train_chart(metrics: dict[str, Any]) -> str:
    rows = metrics.get("train") or []
    steps = [r.get("step") for r in rows]
    keys = [k for k in ("loss", "kd", "ce") if any(k in r for r in rows)]
    series = [charts.Series(f"train {k}", steps, [r.get(k) for r in rows]) for k in keys]
    return charts.line_chart(series, log_y=True, title="training loss")


def val_chart(metrics: dict[str, Any]) -> str:
    rows = metrics.get("val") or []
    steps = [r.get("step") for r in rows]
    series = [charts.Series(f"held-out {k}", steps, [r.get(k) for r in rows], dots=True) for k in ("total", "kl")]
    return charts.line_chart(series, title="held-out (validation)")


def job_page(request: Request) -> Response:
    dash = _dash(request)
    job_id, view, problem = _job_view(request)
    if view is None:
        return problem or dash.message(request, 404, "No such job", "")
    return dash.page(
        request,
        "job.html",
        view=view,
        job_id=job_id,
        title=f"{job_id} - kd-daemon",
        csrf=dash.csrf.issue(f"cancel:{job_id}"),
        done=request.query_params.get("done", ""),
    )


def job_live(request: Request) -> Response:
    dash = _dash(request)
    _, view, problem = _job_view(request)
    if view is None:
        return problem or dash.message(request, 404, "No such job", "")
    return dash.page(request, "job_live.html", view=view)


def _job_view(request: Request) -> tuple[str, data.JobPage | None, Response | None]:
    dash = _dash(request)
    job_id = _job_id(request)
    if job_id is None:
        return "", None, dash.message(request, 404, "No such job", "Job ids look like kd-memory-0123456789abcdef0123.")
    try:
        view = data.job_page(dash.conn, dash.settings, job_id)
    except redis.RedisError as e:
        return job_id, None, dash.message(request, 503, "Redis is unreachable", f"{type(e).__name__}: {e}")
    if view is None:
        text = f"Redis has no job {job_id} (finished jobs are kept for KD_RESULT_TTL seconds)."
        return job_id, None, dash.message(request, 404, "No such job", text)
    return job_id, view, None


# --- actions -------------------------------------------------------------------------------------
async def _refused(request: Request, action: str) -> tuple[Any, Response | None]:
    """The posted form, or the response refusing it (token, CSRF, origin: see security.py)."""
    dash = _dash(request)
    form = await request.form()
    csrf = str(form.get("csrf") or "")
    reason = refusal(
        dash.settings.dashboard_token, str(form.get("token") or ""), dash.csrf.valid(csrf, action), request.headers
    )
    if reason is not None:
        return form, dash.message(request, 403, "Action refused", reason)
    return form, None


async def rollback_action(request: Request) -> Response:
    dash = _dash(request)
    domain = _domain(request)
    if domain is None:
        return dash.message(request, 404, "No such domain", "")
    form, refused = await _refused(request, f"rollback:{domain}")
    if refused is not None:
        return refused
    to = str(form.get("to") or "")
    if not to.isdigit():
        return dash.message(request, 400, "Bad version", "choose the version to roll back to")
    try:
        number, _ = mirror.rollback(dash.settings, lambda: dash.conn, domain, int(to))
    except KDError as e:
        return dash.message(request, 409, "Rollback failed", str(e))
    except redis.RedisError as e:
        return dash.message(request, 503, "Redis is unreachable", f"{type(e).__name__}: {e}")
    return RedirectResponse(f"/domains/{domain}?rolled_back={number}", status_code=303)


async def cancel_action(request: Request) -> Response:
    dash = _dash(request)
    job_id = _job_id(request)
    if job_id is None:
        return dash.message(request, 404, "No such job", "")
    _, refused = await _refused(request, f"cancel:{job_id}")
    if refused is not None:
        return refused
    try:
        outcome = Q.cancel(dash.conn, job_id)
    except KDError as e:
        return dash.message(request, 409, "Cancel failed", str(e))
    except redis.RedisError as e:
        return dash.message(request, 503, "Redis is unreachable", f"{type(e).__name__}: {e}")
    return RedirectResponse(f"/jobs/{job_id}?done={outcome}", status_code=303)


def static_file(request: Request) -> Response:
    name = request.url.path.rsplit("/", 1)[-1]  # only the two routes below reach here
    return Response(_dash(request).static[name], media_type=STATIC[name])


def create_app(
    settings: ClientSettings, bind_host: str = "127.0.0.1", conn: redis.Redis | None = None, secret: bytes | None = None
) -> Starlette:
    """The dashboard app. `conn` defaults to a client of KD_REDIS_URL with the client's short
    timeouts; `secret` (CSRF signing) to fresh random bytes per process."""
    files = resources.files("kd_client.dashboard").joinpath("static")
    app = Starlette(
        routes=[
            Route("/", overview_page),
            Route("/domains/{domain}", domain_page),
            Route("/domains/{domain}/rollback", rollback_action, methods=["POST"]),
            Route("/jobs/{job_id}", job_page),
            Route("/jobs/{job_id}/live", job_live),
            Route("/jobs/{job_id}/cancel", cancel_action, methods=["POST"]),
            *[Route(f"/static/{name}", static_file) for name in STATIC],
        ],
        middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(bind_host)),
            Middleware(SecurityHeaders),
        ],
    )
    app.state.dashboard = Dashboard(
        settings,
        conn if conn is not None else Q.connect(settings, retries=0),
        CsrfTokens(secret or secrets.token_bytes(32)),
        _templates(),
        {name: files.joinpath(name).read_bytes() for name in STATIC},
    )
    return app
