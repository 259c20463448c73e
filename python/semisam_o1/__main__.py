import sys

from semisam_o1.cli import main

sys.exit(main())
