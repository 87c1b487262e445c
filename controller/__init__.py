"""The barista controller: API, provisioning, fleet, mesh, ingest and state over NATS."""
