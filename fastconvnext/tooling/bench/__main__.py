import sys

from fastconvnext.tooling.bench.cli import main

sys.exit(main())
