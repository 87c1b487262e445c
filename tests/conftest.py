"""Shared test configuration: fixtures for each real component live in tests/fixtures/."""

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
