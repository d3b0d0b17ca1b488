import sys

from agentid_server.cli.root import main

sys.exit(main())
