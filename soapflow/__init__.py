"""soapflow: SOAP (Semantically Orthogonal Artifact Projection) as a pipeline."""

from importlib.metadata import PackageNotFoundError, version

from soapflow.errors import SoapError

try:
    __version__ = version("soapflow")
except PackageNotFoundError:  # running from a checkout without install
    __version__ = "0.0.0+local"

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
