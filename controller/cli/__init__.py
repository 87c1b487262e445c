"""The barista command line (talks to the API only, or runs the server)."""
