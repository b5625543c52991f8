import sys

from pdbus.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())
