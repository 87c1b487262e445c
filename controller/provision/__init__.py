"""Provisioning: the provider contract, the engine, bootstrap and providers."""
