"""Running every kernel once before the engine reports ready: on a GPU they
compile on first use, which the first user would otherwise wait for."""

import logging
import time

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from engine_worker.vision import BatchedVisionLM

log = logging.getLogger("engine")


# On a GPU, a batch of prompts this long: their prefill takes the
# matrix-multiply paths for many rows, which short prompts never reach.
LONG_PROMPTS, LONG_PROMPT_TOKENS = 8, 256


def warm_up(gen: BatchGenerator, model) -> None:
    # Two prompts of different lengths exercise both the padded prefill and
    # the decode kernels.
    tic = time.perf_counter()
    gen.insert([[1, 2, 3], [4, 5, 6, 7, 8]], max_tokens=[4, 4])
    while gen.next_generated():
        pass
    if mx.default_device().type == mx.DeviceType.gpu:
        # GPU kernels compile on first use: on a fresh CUDA machine the
        # short warm-up alone took 83 s, and once the first ~150-token
        # request after start kept the core silent past the liveness
        # timeout, so it was killed as hung (docs/benchmarks.md). Compiled
        # here, before the engine reports ready, no request waits for it.
        # The CPU compiles nothing, and there this prefill would cost seconds.
        gen.insert([[1 + (i + j) % 97 for j in range(LONG_PROMPT_TOKENS)]
                    for i in range(LONG_PROMPTS)], max_tokens=[2] * LONG_PROMPTS)
        while gen.next_generated():
            pass
    image = model.warm_up_request() if isinstance(model, BatchedVisionLM) else None
    if image is not None:
        # And the vision encoder, and an image request joining text requests
        # that are decoding: without this, the first text request once image
        # traffic began waited 2.5 to 3 s on an H200 (docs/benchmarks.md).
        # (Only for families whose input tensors can be made here, without
        # their processor: the others compile on their first image.)
        prompt, media = image
        gen.insert([[1, 2, 3], [4, 5]], max_tokens=[8, 8])
        gen.next()
        gen.insert([prompt], max_tokens=[2], caches=[model.cache_for(prompt, media)])
        while gen.next_generated():
            pass
    log.info("warm-up took %.2fs", time.perf_counter() - tic)
