"""Integrations of lmcache_cpp with inference engines.

* :mod:`lmcache_cpp.integration.vllm`: ``LMCacheCppConnector``, a vLLM KV connector
  (``KVConnectorBase_V1``). Importing it imports vLLM; nothing else in lmcache_cpp does.

See ``docs/vllm.md``.
"""
