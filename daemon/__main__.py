import sys

from previewd.cli import main

sys.exit(main())
