"""``python -m tq_web`` runs the ``tq-web`` command."""

from .cli import entry

entry()
