"""`kd-client dashboard`: what an operator sees. Server-rendered pages (Starlette + Jinja2, served
by uvicorn), charts as server-side SVG, live job progress by polling a fragment; no build step.

    data.py      the data layer: adapters_kd/ through jobs.publisher, Redis through kd_client.queue
    charts.py    SVG line charts and sparklines
    security.py  dashboard token, CSRF tokens, origin and host checks
    app.py       routes, templates/ and static/ (package data)
"""
