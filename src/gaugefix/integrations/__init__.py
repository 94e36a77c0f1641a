"""Integrations with training frameworks. Each submodule needs its framework installed:
``gaugefix.integrations.lightning`` comes with ``pip install gaugefix[lightning]``,
``gaugefix.integrations.transformers`` (the Hugging Face ``Trainer``) with
``pip install gaugefix[transformers]``."""

__all__: list[str] = []
