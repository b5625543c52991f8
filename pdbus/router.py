import sys

from pdbus.cli import router_main

if __name__ == "__main__":
    sys.exit(router_main())
