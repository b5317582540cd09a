import sys

from sandhop.cli import main

sys.exit(main())
