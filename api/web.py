"""The web page at `/`: a server-rendered shell whose script fetches every piece of data from the API itself."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, render_template

from api.openapi import operation

bp = Blueprint("web", __name__)

#: The page loads its script, style and data from this origin only, and nothing may run inline or frame it.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
            "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


@bp.get("/")
@operation("get", "/", summary="The web page", responses={200: "text/html"})
def index() -> Response:
    """The page holds no data: only whether the API wants a key, so it knows to ask for one."""
    gate = current_app.extensions["predq.auth"]
    html = render_template("index.html", keys_required=gate.ring is not None)
    return Response(html, mimetype="text/html", headers={"Content-Security-Policy": PAGE_CSP})
