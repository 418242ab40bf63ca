"""``python -m psmsearch`` runs the command line."""

from psmsearch.cli import main

main()
