"""``python -m deepspot.cli``: the same as the ``deepspot`` command."""

from . import main

main()
