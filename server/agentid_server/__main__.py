import sys

from agentid_server.cli import main

sys.exit(main())
