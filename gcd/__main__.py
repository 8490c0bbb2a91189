import sys

from gcd.cli import main

sys.exit(main())
