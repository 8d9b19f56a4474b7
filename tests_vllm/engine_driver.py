"""A vLLM engine in its own process, driven by the end-to-end tests over stdin/stdout.

``python engine_driver.py CONFIG_JSON`` builds ``vllm.LLM`` from the config (see
``conftest.EngineConfig``) and then answers one JSON command per stdin line with one stdout line
that starts with ``@@`` (vLLM's own output goes to stderr or lacks the prefix):

* ``{"op": "generate", "prompts": [[token ids]], "max_tokens": n, "cache_salt": s}`` ->
  ``{"outputs": [[token ids]], "cached": [prompt tokens vLLM did not compute: its prefix cache
  plus the connector]}`` (greedy decoding; a fresh ``cache_salt`` shares no cached KV, in vLLM
  or in lmcache_cpp, so it gives a cold reference run);
* ``{"op": "reset_prefix_cache"}`` -> ``{"ok": true}`` (drops vLLM's own prefix cache);
* ``{"op": "quit"}`` -> exits.

The first line is ``@@{"ready": true, "startup_s": ...}`` once the engine is up.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def _reply(payload: dict[str, Any]) -> None:
    sys.stdout.write("@@" + json.dumps(payload) + "\n")
    sys.stdout.flush()


def _reset_prefix_cache(llm: Any) -> bool:
    """Resets vLLM's prefix cache once the blocks of finished requests are free. A connector
    may keep them for a few engine steps after a request finishes (stores in flight), so steps
    are run until the reset succeeds (bounded)."""
    for _ in range(400):
        if llm.reset_prefix_cache():
            return True
        if not llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()
        time.sleep(0.01)
    return False


def main() -> None:
    config = json.loads(sys.argv[1])
    t0 = time.monotonic()
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {
        "model": config["model"],
        "skip_tokenizer_init": True,
        "block_size": config["block_size"],
        "max_model_len": config["max_model_len"],
        "dtype": "bfloat16",
        "enforce_eager": True,
        "seed": 0,
        "max_num_batched_tokens": config["max_num_batched_tokens"],
        "max_num_seqs": config.get("max_num_seqs") or 256,
    }
    if config.get("connector") is not None:
        kwargs["kv_transfer_config"] = {
            "kv_connector": "LMCacheCppConnector",
            "kv_connector_module_path": "lmcache_cpp.integration.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": config["connector"],
        }
    llm = LLM(**kwargs)
    _reply({"ready": True, "startup_s": time.monotonic() - t0})
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "quit":
            break
        if op == "reset_prefix_cache":
            _reply({"ok": _reset_prefix_cache(llm)})
        elif op == "generate":
            params = SamplingParams(
                temperature=0.0, max_tokens=command["max_tokens"], ignore_eos=True, detokenize=False
            )
            salt = command.get("cache_salt")
            prompts = [
                {"prompt_token_ids": p, **({"cache_salt": salt} if salt else {})}
                for p in command["prompts"]
            ]
            results = llm.generate(prompts, params, use_tqdm=False)
            _reply(
                {
                    "outputs": [list(r.outputs[0].token_ids) for r in results],
                    "cached": [int(r.num_cached_tokens or 0) for r in results],
                }
            )
        else:
            _reply({"error": f"unknown op {op!r}"})


if __name__ == "__main__":
    main()
