"""`python -m cotune ...` is the `cotune` command."""

from cotune.cli import main

raise SystemExit(main())
