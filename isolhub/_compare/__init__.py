"""`isolhub.compare` and `isolhub diff`: both sides run (`compare`, `worker`, `stream`), their
code compared (`code`), and the report in text (`report`, `table`), layers (`layers`) and
HTML (`html`).
"""

__all__: list[str] = []
