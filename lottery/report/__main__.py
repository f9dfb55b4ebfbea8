import sys

from lottery.report import main

sys.exit(main())
