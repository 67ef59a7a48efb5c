"""Per-repo dependency environments (`env="auto"`): what a repo requires (`requirements`)
and the shared, content-addressed overlays installed for it (`environment`).
"""

__all__: list[str] = []
