"""The barista agent: one small asyncio process per machine."""
