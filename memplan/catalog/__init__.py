"""The catalog wing: what memplan knows before planning, as data (standard library only).

- ``paths``: where the ``profiles/`` data lives (``MEMPLAN_PROFILES``, the packaged copy, the checkout);
- ``gpus``: the GPU catalog (``profiles/gpus.json``), memory budgets such as ``24GiB``, the local card;
- ``models``: model specs from ``config.json`` values (catalog names, local files and folders).

Nothing here imports the planning core or anything heavier.
"""
