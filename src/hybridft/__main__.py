import sys

from hybridft.cli import main

sys.exit(main())
