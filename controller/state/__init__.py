"""Durable state in JetStream: typed KV tables and every stream and bucket."""
