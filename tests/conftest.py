import os
import sys

# Pure-logic tests never need a GPU; keep torch from probing for one.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(__file__))

import tempfile

# Prefect flows in tests run in ephemeral mode against a throwaway database.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="soapflow-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("SOAPFLOW_CACHE", os.path.join(os.environ["PREFECT_HOME"], "cache"))
# Never write into the user's registry or work directory from tests (subprocesses inherit these).
os.environ.setdefault("SOAPFLOW_REGISTRY", os.path.join(os.environ["PREFECT_HOME"], "registry"))
os.environ.setdefault("SOAPFLOW_WORKDIR", os.path.join(os.environ["PREFECT_HOME"], "work"))
# Prefect logs INFO from an atexit hook after pytest has closed its captured streams.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
