import sys

from meshpilot.orchestrator.cli.main import main

sys.exit(main())
