import sys

from device_sdk.cli.main import main

sys.exit(main())
