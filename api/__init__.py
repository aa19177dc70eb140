"""The HTTP API: `create_app()` builds the Flask app; gunicorn serves `api:create_app()`."""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from shared.logs import configure_logging
from shared.memory import arrow_allocates_with_malloc
from shared.settings import load_settings

log = logging.getLogger(__name__)


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app; settings come from the environment, overridden by `config`."""
    from api import auth, errors, health, jobs, metrics, mlflow, models, oip, openapi, schedules, web
    from api.fastpath import FastPredict
    from api.parsing import refuse_encoded_bodies
    from api.services import Services

    settings = load_settings(config)
    configure_logging(settings.LOG_LEVEL)
    arrow_allocates_with_malloc()
    for warning in settings.warnings():
        log.warning(warning)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.MAX_UPLOAD_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    auth.init_app(app, settings)  # first: a bad key file stops the process before anything else is loaded
    metrics.init_app(app)  # its timer goes before every other before_request, auth's too
    svc = Services.build(settings)
    app.extensions["predq"] = svc
    loaded = svc.registry.load_all()
    log.info("models loaded", extra={"models": [f"{m.name}/{m.version}" for m in loaded]})
    app.before_request(refuse_encoded_bodies)
    for bp in (health.bp, models.bp, jobs.bp, schedules.bp, mlflow.bp, oip.bp, openapi.bp, web.bp):
        app.register_blueprint(bp)
    errors.register_error_handlers(app)
    if settings.PREDICT_FAST_PATH == "on":
        app.wsgi_app = FastPredict(app, app.wsgi_app)  # type: ignore[method-assign]
    return app
