"""How a result crosses from a worker to the parent: the restricted codec (`codec`), sealed
memfd arenas (`arena`), reads of a trusted worker's memory (`pull`), objects by value
(`byvalue`), and values and state dicts rebuilt on an arena (`values`).

Nothing here imports `isolhub._process`: the worker runtime and the parent use it alike.
"""

__all__: list[str] = []
