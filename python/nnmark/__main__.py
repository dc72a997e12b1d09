"""``python -m nnmark``: the ``nnmark`` command."""
from .cli import main

main()
