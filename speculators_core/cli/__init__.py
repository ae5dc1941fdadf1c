"""The ``speculators`` command line (click)."""
