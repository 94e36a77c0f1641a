"""Integrations with training frameworks. Each submodule needs its framework installed:
``gaugefix.integrations.lightning`` comes with ``pip install gaugefix[lightning]``."""
