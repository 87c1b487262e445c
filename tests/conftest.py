"""Shared test configuration: fixtures for each real component live in tests/fixtures/."""

import pytest

pytest_plugins = [
    "tests.fixtures.nats",
    "tests.fixtures.nats_cluster",
    "tests.fixtures.controller",
    "tests.fixtures.influx",
    "tests.fixtures.moto",
    "tests.fixtures.machine",
    "tests.fixtures.joinlab",
    "tests.fixtures.sshd",
    "tests.fixtures.lab",
    "tests.fixtures.provision",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("barista live clouds")
    for cloud in ("aws", "gcp", "azure"):
        group.addoption(f"--{cloud}", action="store_true", default=False,
                        help=f"also run the provider contract suite against the real {cloud} "
                             "(creates and deletes real VMs, costs money; never in CI; "
                             "settings: tests/fixtures/live_clouds.py)")
