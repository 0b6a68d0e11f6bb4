"""`python -m pixelwise` (also what `torchrun -m pixelwise` runs)."""

from pixelwise.cli import main

raise SystemExit(main())
