"""The fine-tune demos: one module and one config file each.

Every module here not starting with ``_`` is a demo: it defines its config section (a frozen
dataclass) and ``DEMO = Demo(...)`` (see :mod:`jaxla.finetune._demo`), and ``<name>.toml`` beside it
is its built-in config. :mod:`jaxla.finetune._registry` finds them by listing this package; this
file imports none of them.
"""
