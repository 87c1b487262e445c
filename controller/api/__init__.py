"""REST API v1 (aiohttp) and server-sent event streams."""
