import sys

from fluxstudio.cli import main

sys.exit(main())
