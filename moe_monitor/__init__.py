"""moe-monitor: expert-load and step-time monitoring for Mixture-of-Experts models served with vLLM.

Importing this package never imports torch or vllm; only `moe_monitor.plugin` does, inside vLLM.
"""

__version__ = "0.1.0"
