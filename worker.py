"""`python worker.py [--workers N]`: the same as `gql-service worker`."""

import sys

from gql_service.cli.commands import main

if __name__ == "__main__":
    main(["worker", *sys.argv[1:]])
