"""MigrationS3Hook: the amazon provider's S3Hook with credentials from the VMMigration's Secret."""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.sdk import Connection

from hooks.masking import mask
from include.storage.s3 import S3Settings, botocore_config, check_proxied_targets


class MigrationS3Hook(S3Hook):
    """S3 for intermediate storage (AWS or S3-compatible, path-style addressing for custom endpoints).

    Credentials come from the Secret named by ``spec.storage.credentialsSecretRef`` (resolved by the
    pipeline), not from an Airflow connection: the hook builds its connection in memory and masks the
    secret key in every log. Proxies from the environment are not used; a proxy named by the Secret
    (key ``proxy``) is, with the real target of every request checked against the address policy
    (see :mod:`include.storage.s3`).

    :param settings: bucket, region, endpoint, keys, TLS verification and the optional proxy
    """

    def __init__(self, *, settings: S3Settings, **kwargs: Any) -> None:
        mask(settings.secret_key)
        if settings.proxy:
            mask(settings.proxy)  # may hold user:password@
        self.settings = settings
        self.botocore_config = botocore_config(settings)
        super().__init__(aws_conn_id=None, region_name=settings.region, verify=settings.verify,
                         config=self.botocore_config, **kwargs)
        if settings.verify is False:
            self.log.warning("TLS verification is disabled for S3 endpoint %s", settings.endpoint_url)

    @cached_property
    def conn_config(self):
        """The connection AwsGenericHook builds its session from (its documented ``conn_config``), made in
        memory from the Secret's keys: nothing is stored or looked up as an Airflow connection."""
        from airflow.providers.amazon.aws.utils.connection_wrapper import AwsConnectionWrapper

        extra = {"region_name": self.settings.region}
        if self.settings.endpoint_url:
            extra["endpoint_url"] = self.settings.endpoint_url
        conn = Connection(conn_id="vmmigration_s3", conn_type="aws", login=self.settings.access_key,
                          password=self.settings.secret_key, extra=json.dumps(extra))
        return AwsConnectionWrapper(conn=conn, region_name=self.settings.region,
                                    botocore_config=self.botocore_config, verify=self.settings.verify)

    def get_conn(self) -> Any:
        """The boto3 client; with a proxy, each request's real target is checked before it is sent."""
        return check_proxied_targets(super().get_conn(), self.settings)
