"""`isolhub.Hub`: many repos over a pool of workers (`hub`), on this machine (`backend`) or on
Ray actors (`ray_backend`).
"""

__all__: list[str] = []
