import sys

from dsv3_export.cli import main

sys.exit(main())
