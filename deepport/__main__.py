import sys

from deepport.cli import main

sys.exit(main())
