"""`python -m bench …` (what torchrun launches: `torchrun --nproc_per_node N -m bench train …`)."""
from bench.cli import main

raise SystemExit(main())
