"""The Airflow plugin of the "Migrations" page: a FastAPI app mounted at ``/vmmigrations`` and an
external view that puts "Migrations" in the UI's navigation (shown in the UI's iframe).

Every Airflow component loads plugins (task processes too), so this module imports nothing heavy: the
FastAPI app is built on its first request, in the API server (``migrations_ui.app``).
"""

from __future__ import annotations

import threading
from typing import Any

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/vmmigrations"


class LazyMigrationsApp:
    """An ASGI app that builds ``migrations_ui.app.create_app()`` on its first call and hands every call to it."""

    def __init__(self) -> None:
        self._app: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    from migrations_ui.app import create_app

                    self._app = create_app()
        return self._app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.get()(scope, receive, send)


migrations_app = LazyMigrationsApp()


class MigrationsUiPlugin(AirflowPlugin):
    name = "vmmigration_migrations_ui"
    fastapi_apps = [{"app": migrations_app, "url_prefix": URL_PREFIX, "name": "VM migrations"}]
    external_views = [{
        "name": "Migrations",
        # no leading slash: relative to the UI's <base href>, so it works under a base_url path too
        "href": URL_PREFIX.lstrip("/") + "/",
        "destination": "nav",
        "url_route": "migrations",
        "nav_top_level": True,
        "icon": URL_PREFIX.lstrip("/") + "/static/icon.svg",
    }]
