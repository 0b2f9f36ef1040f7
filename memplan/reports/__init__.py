"""The reports wing: what people read.

- ``terminal``: rich views of an estimate, a fit, a simulation, run records;
- ``capacity`` (rows), ``capacity_plots`` (figures), ``capacity_docs`` (Markdown / HTML / CSV): the capacity
  report over many models and cards;
- ``validation``: ``validation.md`` and its CSVs and plot (estimate ÷ measured).

pandas and matplotlib (the ``report`` extra) are imported inside the functions that need them.
"""
