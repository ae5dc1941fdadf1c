"""``python -m speculators_core`` runs the ``speculators`` command line."""

from speculators_core.cli.main import main

main()
