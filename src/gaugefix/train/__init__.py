"""Training-loop integrations: the optimizer hook :class:`GaugeFixing`."""

from gaugefix.train.hook import GaugeFixing, unwrap_model

__all__ = ["GaugeFixing", "unwrap_model"]
