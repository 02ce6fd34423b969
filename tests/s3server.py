"""A real S3 API server for tests: moto in server mode on 127.0.0.1, in a thread of the test process.

Requests are served by a threaded werkzeug server (so many clients can connect at once), but
the moto application itself handles one request at a time. Real S3 evaluates a conditional
``PutObject`` (``If-None-Match: *``) atomically; moto checks the condition and stores the object
in two steps, so two concurrent requests could both pass the check. Serialising requests gives
moto the atomicity S3 guarantees, which the concurrent-publish tests depend on.
"""

from __future__ import annotations

import os
import threading
import uuid

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


class _Serialized:
    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            result = self.app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        return [body]


class S3Server:
    def __init__(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        app = _Serialized(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
        host, port = self._server.server_address[:2]
        self.endpoint_url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> S3Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint_url}

    def env(self) -> dict:
        """Environment for subprocesses that talk to this server."""
        return {**DUMMY_ENV, "AWS_ENDPOINT_URL": self.endpoint_url}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self) -> str:
        name = f"soap-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name
