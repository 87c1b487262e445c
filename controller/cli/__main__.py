"""`python -m controller.cli`: the barista command line."""

from controller.cli.main import main

main()
