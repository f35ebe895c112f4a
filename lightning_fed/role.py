"""Which part of a federation this process plays.

The federation starts the coordinator's process with ``LIGHTNING_FED_ROLE=coordinator``; importing the package
there skips torch and Lightning (the coordinator aggregates numpy arrays only). A leaf module: the package's
``__init__`` and the federation both read the name from here.
"""

COORDINATOR_ROLE_ENV = "LIGHTNING_FED_ROLE"
COORDINATOR_ROLE = "coordinator"
