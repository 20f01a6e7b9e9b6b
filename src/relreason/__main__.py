import sys

from relreason.cli import main

sys.exit(main())
