"""NATS for the controller: the embedded server, permissions, node admission."""
