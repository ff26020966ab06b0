"""CLI verbs: one module each, discovered by :mod:`..cli` (``register(subparsers)``)."""
