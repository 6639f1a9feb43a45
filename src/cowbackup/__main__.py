"""``python -m cowbackup`` runs the command-line interface."""

from cowbackup.cli.main import main

raise SystemExit(main())
