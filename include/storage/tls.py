"""TLS verification settings of a storage backend, from its Secret (shared by S3 and HTTP)."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from include.inventory import Credentials

log = logging.getLogger(__name__)


def tls_verify(credentials: Credentials | None, endpoint: str | None, what: str) -> bool | str:
    """True (system CAs), a CA bundle file from the Secret's ``caBundle``, or False when the Secret sets
    ``insecureSkipVerify`` (logged as a warning every time)."""
    if credentials is None:
        return True
    if (credentials.first("insecureSkipVerify") or "").lower() in ("true", "1", "yes"):
        log.warning("TLS verification is DISABLED for %s %s (Secret %s sets insecureSkipVerify)",
                    what, endpoint, credentials.source)
        return False
    bundle = credentials.first("caBundle", "ca.crt")
    if not bundle:
        return True
    # a CA bundle is public: one file per distinct bundle, written once, not one per connection
    path = Path(tempfile.gettempdir()) / f"vmmigration-ca-{hashlib.sha256(bundle.encode()).hexdigest()[:16]}.pem"
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=".vmmigration-ca-", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(bundle)
        os.replace(tmp, path)
    return str(path)
