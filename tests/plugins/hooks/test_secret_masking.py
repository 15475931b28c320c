"""The hooks mask the secrets they read, in a real Airflow task log: a small DAG runs under
``airflow tasks test``, builds MigrationS3Hook and the HTTP storage backend from Secret values, then
logs those values the way a careless library would. The task's output must show ``***`` and never the
values (which exist only in this process's environment, so nothing else could have written them)."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

DAG = '''
import logging
import os

from airflow.sdk import dag, task


@dag(dag_id="masking_check", schedule=None)
def masking_check():
    @task
    def use_the_hooks():
        from hooks.factories import http_backend
        from hooks.s3_storage_hook import MigrationS3Hook
        from include.inventory import Credentials
        from include.spec import StorageSpec
        from include.storage.s3 import S3Settings

        key, token = os.environ["MASKING_S3_KEY"], os.environ["MASKING_HTTP_TOKEN"]
        MigrationS3Hook(settings=S3Settings(bucket="b", region="us-east-1", endpoint_url="http://127.0.0.1:9",
                                            access_key="AKIAMASKING", secret_key=key))
        http_backend(StorageSpec(type="http", endpoint="http://127.0.0.1:9/store"),
                     Credentials({"token": "Bearer_" + token}, "default/http-token"))
        log = logging.getLogger("some.library")
        log.warning("library debug: secret_key=%s", key)
        logging.getLogger("airflow.task").warning("task logger: secret_key=%s", key)
        log.warning(f"fstring stdlib: secret_key={key}")
        from airflow.sdk import get_current_context
        get_current_context()["ti"].task.log.warning("operator log: secret_key=%s", key)
        import structlog
        structlog.get_logger("x").warning("structlog: secret_key=%s", key)
        log.warning("library debug: Authorization: Bearer %s", token)
        print("printed:", key, token)
        try:
            raise RuntimeError(f"a library error quoting {key}")
        except RuntimeError:
            log.exception("traceback follows")

    use_the_hooks()


masking_check()
'''


@pytest.mark.e2e
def test_hook_secrets_are_masked_in_the_task_log(airflow_db, tmp_path):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "masking_check.py").write_text(DAG)
    key, token = secrets.token_hex(20), secrets.token_hex(16)
    env = dict(os.environ, PYTHONPATH=str(ROOT), AIRFLOW__CORE__DAGS_FOLDER=str(dags),
               MASKING_S3_KEY=key, MASKING_HTTP_TOKEN=token, VMMIGRATION_ALLOW_LOOPBACK="true")
    proc = subprocess.run([str(Path(sys.executable).parent / "airflow"), "tasks", "test", "masking_check",
                           "use_the_hooks"], capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    states = re.findall(r"new_state=(\w+)", out)
    assert states and states[-1] == "success", out[-4000:]
    for line in ("library debug: secret_key=***", "library debug: Authorization: Bearer ***",
                 "task logger: secret_key=***", "fstring stdlib: secret_key=***", "operator log: secret_key=***",
                 "structlog: secret_key=***", "printed: *** ***"):
        assert line in out, f"{line!r} not in the task log:\n{out[-4000:]}"
    assert "RuntimeError: a library error quoting ***" in out  # tracebacks are redacted too
    assert key not in out and token not in out
