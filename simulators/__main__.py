"""`python -m simulators`: the same as the `dicom-gateway-sim` console script."""

from simulators.cli import main

raise SystemExit(main())
