"""``python -m lepton_edge.cloud.embedded_broker -c broker.conf``"""

import sys

from .server import main

if __name__ == "__main__":
    sys.exit(main())
