"""A vLLM engine in its own process, driven by the end-to-end tests over stdin/stdout.

``python engine_driver.py CONFIG_JSON`` builds ``vllm.LLM`` from the config (see
``conftest.EngineConfig``) and then answers one JSON command per stdin line with one stdout line
that starts with ``@@`` (vLLM's own output goes to stderr or lacks the prefix):

* ``{"op": "generate", "prompts": [[token ids]], "max_tokens": n, "cache_salt": s}`` ->
  ``{"outputs": [[token ids]], "cached": [prompt tokens vLLM did not compute: its prefix cache
  plus the connector]}`` (greedy decoding; a fresh ``cache_salt`` shares no cached KV, in vLLM
  or in lmcache_cpp, so it gives a cold reference run);
* ``{"op": "reset_prefix_cache"}`` -> ``{"ok": true, "waited_s": s}`` (drops vLLM's own prefix
  cache once the connector has released the blocks of finished requests, ``s`` seconds later);
* ``{"op": "fail_next_loads", "count": n}`` -> ``{"ok": true}``: the next ``n`` loads of the
  connector fail after poisoning the blocks they filled (see :func:`_fail_next_loads`; needs the
  worker in this process, i.e. ``VLLM_ENABLE_V1_MULTIPROCESSING=0``);
* ``{"op": "quit"}`` -> exits.

The first line is ``@@{"ready": true, "startup_s": ...}`` once the engine is up.

The config's ``failure_policy`` is passed as ``kv_load_failure_policy`` (default
``"recompute"``); ``null`` leaves vLLM's own default.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def _reply(payload: dict[str, Any]) -> None:
    sys.stdout.write("@@" + json.dumps(payload) + "\n")
    sys.stdout.flush()


def _reset_prefix_cache(llm: Any) -> dict[str, Any]:
    """Resets vLLM's prefix cache once the blocks of finished requests are free. A connector
    may keep them for a few engine steps after a request finishes (stores in flight), so steps
    are run until the reset succeeds, for up to 30 s. The reply says how long the blocks were
    held (``waited_s``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30.0:
        if llm.reset_prefix_cache():
            return {"ok": True, "waited_s": time.monotonic() - t0}
        if not llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()
        time.sleep(0.01)
    return {"ok": False, "waited_s": time.monotonic() - t0}


_injected_failures = [0]  # loads left to fail


def _fail_next_loads(count: int) -> bool:
    """Test hook: the next ``count`` loads of the connector's worker copy their chunks, then
    overwrite the tokens they filled with a constant and raise, like a load that went wrong half
    way. The poison matters: after ``reset_prefix_cache`` the blocks a load fills may still hold
    the right KV from an earlier run, so a load error that vLLM ignored would go unnoticed
    without it. The worker runs in this process only without vLLM's multiprocessing."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        return False
    import numpy as np

    from lmcache_cpp.errors import InternalError
    from lmcache_cpp.integration.vllm_parts import WorkerSession

    if not hasattr(WorkerSession, "_real_retrieve"):  # patched once
        real = WorkerSession.retrieve

        def retrieve(self: Any, key: Any, block_ids: Any, skip: int) -> None:
            real(self, key, block_ids, skip)
            if _injected_failures[0] <= 0:
                return
            _injected_failures[0] -= 1
            cs = self.chunk_size
            chunks = range(key.start // cs, key.end // cs)
            poison = np.full(self._object_bytes, 0x3F, dtype=np.uint8)  # bf16 0x3F3F ~ 0.75
            self._kv.scatter_batch(
                cs,
                [poison] * len(chunks),
                [self._chunk(block_ids, c) for c in chunks],
                skip_tokens=[min(max(skip - c * cs, 0), cs) for c in chunks],
            )
            raise InternalError("load failure injected by the test")

        WorkerSession._real_retrieve = real
        WorkerSession.retrieve = retrieve
    _injected_failures[0] = count
    return True


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
            "kv_connector_extra_config": config["connector"],
        }
        policy = config.get("failure_policy", "recompute")
        if policy is not None:
            kwargs["kv_transfer_config"]["kv_load_failure_policy"] = policy
    llm = LLM(**kwargs)
    _reply({"ready": True, "startup_s": time.monotonic() - t0})
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "quit":
            break
        if op == "reset_prefix_cache":
            _reply(_reset_prefix_cache(llm))
        elif op == "fail_next_loads":
            _reply({"ok": _fail_next_loads(int(command["count"]))})
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
