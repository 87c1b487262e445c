"""`python -m controller`: the barista command line."""

from controller.cli.main import main

main()
