"""soapflow: SOAP (Semantically Orthogonal Artifact Projection) as a pipeline."""

import os
from importlib.metadata import PackageNotFoundError, version

from soapflow.errors import SoapError

try:
    __version__ = version("soapflow")
except PackageNotFoundError:  # running from a checkout without install
    __version__ = "0.0.0+local"

# In a checkout the stage folders (flows/, tasks/, storage/, noise_generators/) sit beside this
# package; installed, setuptools maps them into it (pyproject's package-dir). Either way they
# import as soapflow.flows, soapflow.tasks, …
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_installed = os.path.isdir(os.path.join(__path__[0], "storage"))
if not _installed and os.path.isfile(os.path.join(_checkout, "storage", "__init__.py")):
    __path__.append(_checkout)

__all__ = ["SOAPHead", "SoapError", "__version__", "attach", "load_head"]


def __getattr__(name):
    # torch is heavy; import it only for users of the head, not for `soap fit` workers.
    if name == "SOAPHead":
        from soapflow.head import SOAPHead

        return SOAPHead
    if name in ("load_head", "attach"):
        from soapflow import consume

        return getattr(consume, name)
    raise AttributeError(name)
