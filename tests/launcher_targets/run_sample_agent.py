"""Run the sample agent as a console script does: ``sys.exit(main())``."""

import sys

from sample_agent.entry import main

sys.exit(main())
