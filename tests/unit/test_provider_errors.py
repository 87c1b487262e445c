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
