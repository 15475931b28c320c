"""The FastAPI app of the "Migrations" page, mounted by the plugin at ``/vmmigrations`` in Airflow's API server.

Routes (all behind Airflow's own authentication):

- ``GET /``: the page (plain HTML, JS and CSS from ``static/``; no build step). Without a valid login it
  redirects to the auth manager's login page, which comes back here.
- ``GET /api/migrations``: the JSON the page polls every 2.5 s (``migrations_ui.overview``). 401 without a
  login, 403 with an invalid token.
- ``GET /static/<file>``: the page's script, style sheet and icon.

Airflow does not authenticate a plugin's FastAPI app (a mounted app inherits none of the core API's
dependencies), so every route here asks Airflow's own ``get_user`` (``airflow.api_fastapi.core_api.security``):
the ``Authorization: Bearer`` JWT when there is one, else the UI's ``_token`` cookie, as the REST API does.
The root middlewares of the API server (the JWT refresh, the all-admins middleware of the SimpleAuthManager
when it is set to that) run before this app as before the REST API. Each migration is listed only when the
auth manager lets the user read its DAG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from include.store import SpecStore
from migrations_ui.overview import SpecCache, overview
from migrations_ui.runs import latest_runs

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"migrations.js": "text/javascript", "migrations.css": "text/css", "icon.svg": "image/svg+xml"}


async def current_user(request: Request) -> Any:
    """The user Airflow's core API would see for this request; raises 401/403 as the core API does."""
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.security import HTTPBearer

    credentials = await HTTPBearer(auto_error=False)(request)
    return await get_user(request, _oauth_token=None, bearer_credentials=credentials)


def _dag_reader(user: Any):
    """Whether ``user`` may read a DAG, as the auth manager decides (by role for the SimpleAuthManager)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    manager = get_auth_manager()

    def allowed(dag_id: str) -> bool:
        return manager.is_authorized_dag(method="GET", details=DagDetails(id=dag_id), user=user)

    return allowed


UserDep = Annotated[Any, Depends(current_user)]


def create_app() -> FastAPI:
    app = FastAPI(title="VM migrations", docs_url=None, redoc_url=None, openapi_url=None)
    cache = SpecCache()

    @app.get("/", include_in_schema=False)
    async def page(request: Request) -> Response:
        try:
            await current_user(request)
        except HTTPException as err:
            if err.status_code not in (401, 403):
                raise
            from airflow.api_fastapi.app import get_auth_manager

            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/migrations")
    def migrations(user: UserDep) -> JSONResponse:
        store = SpecStore()
        doc = overview(store, cache, latest_runs(), allowed=_dag_reader(user))
        return JSONResponse(doc, headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str, user: UserDep) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404, "Not Found")
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    return app
