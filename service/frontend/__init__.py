"""The protocol front end: the ASGI app (hot routes below the framework, FastAPI for the rest), the shared HTTP
kit, the lifecycle, and one module per protocol, each depending on the neutral core (service/core.py) and never
on another protocol."""
