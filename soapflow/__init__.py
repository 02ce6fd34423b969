"""soapflow: SOAP (Semantically Orthogonal Artifact Projection) as a pipeline."""

from importlib.metadata import PackageNotFoundError, version

from soapflow.errors import SoapError

try:
    __version__ = version("soapflow")
except PackageNotFoundError:  # running from a checkout without install
    __version__ = "0.0.0+local"

__all__ = ["SoapError", "__version__"]
