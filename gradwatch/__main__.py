"""`python -m gradwatch`: the same CLI as the `gradwatch` command."""

from .cli import entry

entry()
