"""``python -m bytemtp``: the same CLI, as ``torchrun -m bytemtp train`` needs."""

from bytemtp.cli import main

main()
