"""Running every kernel once before the engine reports ready: on a GPU they
compile on first use, which the first user would otherwise wait for."""

import logging
import time

from mlx_lm.generate import BatchGenerator

from engine_worker.vision import BatchedVisionLM

log = logging.getLogger("engine")


def warm_up(gen: BatchGenerator, model) -> None:
    # Two prompts of different lengths exercise both the padded prefill and
    # the decode kernels.
    tic = time.perf_counter()
    gen.insert([[1, 2, 3], [4, 5, 6, 7, 8]], max_tokens=[4, 4])
    while gen.next_generated():
        pass
    if isinstance(model, BatchedVisionLM):
        # And the vision encoder, and an image request joining text requests
        # that are decoding: without this, the first text request once image
        # traffic began waited 2.5 to 3 s on an H200 (docs/benchmarks.md).
        prompt, media = model.warm_up_request()
        gen.insert([[1, 2, 3], [4, 5]], max_tokens=[8, 8])
        gen.next()
        gen.insert([prompt], max_tokens=[2], caches=[model.cache_for(prompt, media)])
        while gen.next_generated():
            pass
    log.info("warm-up took %.2fs", time.perf_counter() - tic)
