import sys

from pdbus.cli import main

sys.exit(main())
