"""vllm-inference-api: an OpenAI-compatible gateway and lifecycle manager for vLLM."""

__version__ = "0.1.0"
