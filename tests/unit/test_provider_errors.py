"""Each cloud's error codes map to the contract's typed errors, with their scope (a table)."""

from __future__ import annotations

import pytest

from controller.provision.contract import (
    CapacityError,
    CredentialsError,
    InvalidRequestError,
    NotFoundError,
    ProvisionError,
    QuotaError,
    TransientError,
)

botocore = pytest.importorskip("botocore")

AWS_TABLE = [
    ("RequestLimitExceeded", TransientError, "region", True),
    ("Throttling", TransientError, "region", True),
    ("InternalError", TransientError, "region", True),
    ("InsufficientInstanceCapacity", CapacityError, "zone", False),
    ("InstanceLimitExceeded", QuotaError, "region", False),
    ("VcpuLimitExceeded", QuotaError, "region", False),
    ("AuthFailure", CredentialsError, "provider", False),
    ("UnauthorizedOperation", CredentialsError, "provider", False),
    ("InvalidInstanceID.NotFound", NotFoundError, "region", False),
    ("InvalidKeyPair.NotFound", NotFoundError, "region", False),
    ("InvalidKeyPair.Duplicate", InvalidRequestError, "region", False),
    ("InvalidParameterValue", InvalidRequestError, "region", False),
    ("SomethingNew", InvalidRequestError, "region", False),
]


@pytest.mark.parametrize(("code", "kind", "scope", "retryable"), AWS_TABLE)
def test_aws_error_codes(code: str, kind: type[ProvisionError], scope: str,
                         retryable: bool) -> None:
    from botocore.exceptions import ClientError

    from controller.provision.providers.aws import map_error

    exc = ClientError({"Error": {"Code": code, "Message": "m"}}, "RunInstances")
    err = map_error(exc, region="us-east-1", zone="us-east-1b")
    assert type(err) is kind
    assert (err.scope, err.retryable, err.code, err.provider) == (scope, retryable, code, "aws")
    assert err.where == {"zone": "zone us-east-1b", "region": "region us-east-1",
                         "provider": "provider aws"}[scope]


def test_aws_connection_failures_are_transient() -> None:
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from controller.provision.providers.aws import map_error

    assert isinstance(map_error(EndpointConnectionError(endpoint_url="http://x")),
                      TransientError)
    assert isinstance(map_error(NoCredentialsError()), CredentialsError)


GCP_HTTP_TABLE = [
    (429, "rateLimitExceeded", TransientError, "region"),
    (403, "rateLimitExceeded", TransientError, "region"),
    (403, "quotaExceeded", QuotaError, "region"),
    (403, "forbidden", CredentialsError, "provider"),
    (401, "authError", CredentialsError, "provider"),
    (404, "notFound", NotFoundError, "region"),
    (400, "invalid", InvalidRequestError, "region"),
    (400, "resourceNotReady", TransientError, "region"),
    (409, "alreadyExists", InvalidRequestError, "region"),  # ensure_network takes it as made
    (503, "backendError", TransientError, "region"),
    (500, "", TransientError, "region"),
]


@pytest.mark.parametrize(("status", "reason", "kind", "scope"), GCP_HTTP_TABLE)
def test_gcp_http_errors(status: int, reason: str, kind: type[ProvisionError],
                         scope: str) -> None:
    gx = pytest.importorskip("google.api_core.exceptions")
    from controller.provision.providers.gcp import map_error

    errors = [{"reason": reason, "message": "m"}] if reason else []
    exc = gx.from_http_status(status, "m", errors=errors)
    err = map_error(exc, region="us-central1", zone="us-central1-a")
    assert (type(err), err.scope, err.provider) == (kind, scope, "gcp")
    assert err.code == (reason or str(status))  # (what ensure_network reads: alreadyExists)


GCP_OPERATION_TABLE = [
    ("ZONE_RESOURCE_POOL_EXHAUSTED", CapacityError, "zone"),
    ("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", CapacityError, "zone"),
    ("QUOTA_EXCEEDED", QuotaError, "region"),
    ("RESOURCE_NOT_FOUND", NotFoundError, "region"),
    ("SOMETHING_NEW", InvalidRequestError, "region"),
]


@pytest.mark.parametrize(("code", "kind", "scope"), GCP_OPERATION_TABLE)
def test_gcp_operation_errors(code: str, kind: type[ProvisionError], scope: str) -> None:
    compute_v1 = pytest.importorskip("google.cloud.compute_v1")
    from controller.provision.providers.gcp import operation_error

    op = compute_v1.Operation(name="operation-1", status="DONE", error=compute_v1.Error(
        errors=[compute_v1.Errors(code=code, message="m")]))
    err = operation_error(op, region="us-central1", zone="us-central1-a")
    assert err is not None
    assert (type(err), err.scope, err.code) == (kind, scope, code)
    assert operation_error(compute_v1.Operation(name="ok", status="DONE"),
                           region="us-central1") is None


AZURE_TABLE = [
    (429, "TooManyRequests", TransientError, "region"),
    (503, "ServiceUnavailable", TransientError, "region"),
    (429, "RetryableError", TransientError, "region"),
    (400, "ReferencedResourceNotProvisioned", TransientError, "region"),
    (409, "AnotherOperationInProgress", TransientError, "region"),
    (200, "ZonalAllocationFailed", CapacityError, "zone"),
    (409, "AllocationFailed", CapacityError, "zone"),
    (409, "SkuNotAvailable", CapacityError, "zone"),
    (409, "QuotaExceeded", QuotaError, "region"),
    (409, "OperationNotAllowed", QuotaError, "region"),
    (401, "AuthenticationFailed", CredentialsError, "provider"),
    (403, "AuthorizationFailed", CredentialsError, "provider"),
    (404, "ResourceNotFound", NotFoundError, "region"),
    (404, "ResourceGroupNotFound", NotFoundError, "region"),
    (400, "InvalidParameter", InvalidRequestError, "region"),
    (500, "", TransientError, "region"),
]


@pytest.mark.parametrize(("status", "code", "kind", "scope"), AZURE_TABLE)
def test_azure_error_codes(status: int, code: str, kind: type[ProvisionError],
                           scope: str) -> None:
    ax = pytest.importorskip("azure.core.exceptions")
    from controller.provision.providers.azure import map_error

    exc = ax.HttpResponseError(message="m")
    exc.status_code = status
    exc.error = ax.ODataV4Format({"code": code, "message": "m"}) if code else None
    err = map_error(exc, region="eastus", zone="eastus-2")
    assert (type(err), err.scope) == (kind, scope)
    if code:
        assert err.code == code


def test_azure_auth_failures_are_credentials() -> None:
    ax = pytest.importorskip("azure.core.exceptions")
    from controller.provision.providers.azure import map_error

    err = map_error(ax.ClientAuthenticationError("no token"))
    assert isinstance(err, CredentialsError) and "az login" in err.message
