"""``python -m surgery ...``: the clipsurgery command line (also what torchrun -m surgery runs)."""
from surgery.cli.main import main

main()
