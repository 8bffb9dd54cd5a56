import sys

from fastconvnext.bench.cli import main

sys.exit(main())
