"""Vision-language generation in the engine loop, in-process, with the tiny
random-weight VLMs: media requests join the same batch as text requests, each
keeps its own image, and batching changes nothing any request gets."""

import hashlib
import time
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from engine_worker.admission import Admission
from engine_worker.loop import Loop
from engine_worker.media_client import PreparedItem
from engine_worker.messages import Request
from engine_worker.model import load_model, read_facts
from engine_worker.request_builder import expand_placeholders
from engine_worker.sampling import SamplingParams
from media_worker.processor import Preprocessor
from tests.conftest import make_test_vlms
from tests.test_loop import Collector, tokens_of
from vllm_mlx.settings import EngineSettings


class Prompter:
    """Builds engine requests the way the engine's front end does: the chat
    template renders each media part as its family's token, the media
    worker's processor prepares each item, and each item's tokens take its
    token's place (request_builder.expand_placeholders)."""

    def __init__(self, path):
        self.pre = Preprocessor(str(path))
        self.tokenizer = self.pre.tokenizer

    def request(self, rid, text, images=(), videos=(), max_tokens=12, **sampling) -> Request:
        content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
        content.append({"type": "text", "text": text})
        return self.chat(rid, [{"role": "user", "content": content}], images, videos,
                         max_tokens, **sampling)

    def chat(self, rid, messages, images=(), videos=(), max_tokens=12, **sampling) -> Request:
        """A request for a whole conversation; `images` and `videos` in prompt order."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        prepared = [self.pre.image(i) for i in images] + [self.pre.video(v) for v in videos]
        # The media worker hashes an item's bytes; its tensors stand in for them here.
        items = [PreparedItem("", [], 0, p.placeholder_token_id, p.token_ids, 1,
                              hashlib.sha256(b"".join(np.ascontiguousarray(t).tobytes()
                                                      for t in p.tensors.values())).hexdigest())
                 for p in prepared]
        prompt, spans = expand_placeholders(list(ids), items)
        return Request(rid, prompt, max_tokens, SamplingParams(**sampling),
                       media=[p.tensors for p in prepared], media_spans=spans)


def picture(w, h, seed) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def start_engine(path, after_step=None, admission=None, **settings) -> Loop:
    collector = Collector()
    s = EngineSettings(model=str(path), max_num_seqs=8, max_queue=64, **settings)
    e = Loop(s, lambda s: load_model(read_facts(s.model)), collector.publish,
             after_step=after_step, admission=admission)
    e.start()
    assert e.ready.wait(60) and e.load_error is None, e.load_error
    e.collector = collector
    collector.guard(e)
    return e


@pytest.fixture(scope="module")
def vlm_engine(tiny_vlm):
    e = start_engine(tiny_vlm)
    e.prompter = Prompter(tiny_vlm)
    yield e
    e.stop()


def mlx_vlm_tokens(path, text: str, image, max_tokens: int) -> list[int]:
    """mlx-vlm's own greedy output for one image and a question: the reference."""
    import mlx_vlm

    model, processor = mlx_vlm.load(str(path))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
        add_generation_prompt=True, tokenize=False)
    out = mlx_vlm.generate(model, processor, prompt, image=[image], max_tokens=max_tokens,
                           verbose=False)
    return out.token_ids


def run(engine, request) -> list[int]:
    engine.submit(request)
    return tokens_of(engine.collector.wait(request.request_id))


def test_loads_as_vision_model(tiny_vlm):
    facts = read_facts(str(tiny_vlm))
    assert facts.vision and facts.modalities == ["text", "image", "video"]


def test_image_requests_batch_with_text_requests(vlm_engine):
    p = vlm_engine.prompter
    small, large = picture(60, 40, 1), picture(200, 120, 2)

    def requests(tag):
        return [p.request(f"{tag}-img-small", "Describe it.", images=[small]),
                p.request(f"{tag}-text-0", "Tell me a story."),
                p.request(f"{tag}-img-large", "Describe it.", images=[large]),
                p.request(f"{tag}-text-1", "Hello there, robot", temperature=0.8, seed=7),
                p.request(f"{tag}-two", "Compare them.", images=[large, small])]

    alone = {r.request_id.split("-", 1)[1]: run(vlm_engine, r) for r in requests("alone")}
    batch = requests("batch")
    for r in batch:
        vlm_engine.submit(r)
    together = {r.request_id.split("-", 1)[1]: tokens_of(vlm_engine.collector.wait(r.request_id))
                for r in batch}
    assert together == alone
    # The image is what the answer depends on: other pictures, other tokens.
    assert alone["img-small"] != alone["img-large"]
    assert vlm_engine.stats.running == 0


def test_image_request_matches_mlx_vlm_generate(vlm_engine, tiny_vlm):
    """The batched path gives mlx-vlm's own single-request greedy output."""
    p = vlm_engine.prompter
    image = picture(90, 70, 3)
    ours = run(vlm_engine, p.request("ref", "What is in the picture?", images=[image],
                                     max_tokens=10))
    assert ours == mlx_vlm_tokens(tiny_vlm, "What is in the picture?", image, 10)


def test_image_request_joins_mid_decode(vlm_engine):
    p = vlm_engine.prompter
    image = picture(120, 90, 4)
    alone = run(vlm_engine, p.request("solo", "Look.", images=[image], max_tokens=30))
    text_alone = run(vlm_engine, p.request("solo-text", "Once upon a time", max_tokens=40))
    seen = vlm_engine.collector.published
    vlm_engine.submit(p.request("long-text", "Once upon a time", max_tokens=40))
    seen.clear()
    assert seen.wait(10)
    vlm_engine.submit(p.request("joined", "Look.", images=[image], max_tokens=30))
    joined = tokens_of(vlm_engine.collector.wait("joined"))
    text_joined = tokens_of(vlm_engine.collector.wait("long-text"))
    assert joined == alone
    assert text_joined == text_alone


def test_video_request(vlm_engine):
    p = vlm_engine.prompter
    frames = np.stack([np.asarray(picture(80, 60, 10 + i)) for i in range(4)])
    alone = run(vlm_engine, p.request("video", "What happens?", videos=[frames]))
    assert len(alone) == 12
    vlm_engine.submit(p.request("video-b", "What happens?", videos=[frames]))
    vlm_engine.submit(p.request("text-b", "What happens?"))
    assert tokens_of(vlm_engine.collector.wait("video-b")) == alone


def test_text_requests_still_share_prefixes(vlm_engine):
    p = vlm_engine.prompter
    r = p.request("pfx-a", "A long shared question about the little robot and the market.")
    first = run(vlm_engine, r)
    hits = vlm_engine.stats.cache_hits
    again = run(vlm_engine, p.request("pfx-b", r_text := "A long shared question about the "
                                      "little robot and the market."))
    assert r_text and again == first
    assert vlm_engine.stats.cache_hits == hits + 1


def test_bad_media_fails_only_that_request(vlm_engine):
    p = vlm_engine.prompter
    bad = p.request("bad", "Look.", images=[picture(60, 40, 5)])
    bad.media[0]["image_grid_thw"] = np.array([[1, 2, 2]])  # does not match pixel_values
    good = p.request("good", "Look.", images=[picture(60, 40, 5)])
    vlm_engine.submit(bad)
    vlm_engine.submit(good)
    out = vlm_engine.collector.wait("bad")
    assert out[-1].finish_reason == "error"
    assert vlm_engine.collector.wait("good")[-1].finish_reason == "length"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_other_families_batch(family, tmp_path):
    path = make_test_vlms.build_vlm_model(tmp_path / family, family=family).resolve()
    e = start_engine(path)
    try:
        p = Prompter(path)
        a, b = picture(70, 50, 6), picture(150, 100, 7)
        alone = [run(e, p.request("a", "Describe.", images=[a])),
                 run(e, p.request("b", "Describe.", images=[b]))]
        for r in (p.request("a2", "Describe.", images=[a]), p.request("t2", "Hi"),
                  p.request("b2", "Describe.", images=[b])):
            e.submit(r)
        together = [tokens_of(e.collector.wait(rid)) for rid in ("a2", "b2")]
        assert together == alone and alone[0] != alone[1]
        assert alone[1] == mlx_vlm_tokens(path, "Describe.", b, 12)
    finally:
        e.stop()


def test_chunked_prefill_keeps_image_rows_apart(vlm_engine, tiny_vlm):
    """Prompts cut into small prefill chunks (an image spans several) give the
    same tokens as whole prompts."""
    p = vlm_engine.prompter
    a, b = picture(100, 60, 8), picture(60, 100, 9)
    whole = [run(vlm_engine, p.request(f"whole-{i}", "Describe.", images=[im]))
             for i, im in enumerate((a, b))]
    e = start_engine(tiny_vlm, prefill_step_size=7)
    try:
        for i, im in enumerate((a, b)):
            e.submit(p.request(f"chunked-{i}", "Describe.", images=[im]))
        e.submit(p.request("chunked-text", "Describe."))
        assert [tokens_of(e.collector.wait(f"chunked-{i}")) for i in range(2)] == whole
    finally:
        e.stop()


class RecordingAdmission(Admission):
    """The default policy, noting each group it admits and whether a text
    request was still waiting for its first token then."""

    def __init__(self, settings: EngineSettings):
        super().__init__(settings.max_num_seqs, settings.prefill_batch_size,
                         settings.admit_window_s)
        self.groups: list[tuple[list[str], bool]] = []

    def choose(self, batch, cost, fits, cached_blocks):
        decision = super().choose(batch, cost, fits, cached_blocks)
        if decision.admit:
            self.groups.append(([r.request_id for r in decision.admit],
                                batch.text_awaiting_first))
        return decision


def test_media_requests_join_one_per_step_after_text_first_tokens(tiny_vlm):
    """Image requests waiting together are encoded one per step, so decode
    steps run between encodes; a text request behind them joins first, and
    no encoder runs while a text request waits for its first token."""
    p = Prompter(tiny_vlm)
    policy = RecordingAdmission(EngineSettings(model="", max_num_seqs=8))
    burst = [p.request(f"img-{i}", "Describe.", images=[picture(40 + 10 * i, 30, i)])
             for i in range(3)] + [p.request("text", "Hello there")]

    def after_step(prompt_responses, responses):
        while burst:  # on the loop's thread: all four wait together
            e.submit(burst.pop(0))

    e = start_engine(tiny_vlm, after_step=after_step, admission=policy)
    try:
        e.submit(p.request("first", "Hi", max_tokens=16))
        for rid in ("first", "img-0", "img-1", "img-2", "text"):
            e.collector.wait(rid)
    finally:
        e.stop()
    admitted = [ids for ids, _ in policy.groups]
    assert admitted == [["first"], ["text"], ["img-0"], ["img-1"], ["img-2"]], admitted
    assert not any(text_waiting for ids, text_waiting in policy.groups[2:])


def test_steady_text_traffic_does_not_starve_a_media_request(tiny_vlm):
    """A text request arriving at every step keeps one waiting for its first
    token all the time; the image request still joins, once it has been held
    back for MEDIA_HOLD_MAX_S."""
    from engine_worker.admission import MEDIA_HOLD_MAX_S

    p = Prompter(tiny_vlm)
    policy = RecordingAdmission(EngineSettings(model="", max_num_seqs=8))
    limit = 3000
    sent = [0]

    def image_admitted() -> bool:
        return any("img" in ids for ids, _ in policy.groups)

    def after_step(prompt_responses, responses):
        if sent[0] < limit and not image_admitted():
            e.submit(p.request(f"t-{sent[0]}", "Hi", max_tokens=2))
            sent[0] += 1

    e = start_engine(tiny_vlm, after_step=after_step, admission=policy)
    try:
        e.submit(p.request("warm", "Hi", max_tokens=2))
        e.collector.wait("warm")
        tic = time.monotonic()
        e.submit(p.request("img", "Describe.", images=[picture(40, 30, 0)]))
        e.collector.wait("img")
        waited = time.monotonic() - tic
    finally:
        e.stop()
    # Text requests stop once the image is in: sent[0] is how many came first.
    assert image_admitted() and sent[0] < limit, "text traffic starved the image"
    assert sent[0] > 0 and waited >= MEDIA_HOLD_MAX_S * 0.9


def test_sliced_encoding_matches_the_whole_encoder(tiny_vlm, monkeypatch):
    """The encoder on its own thread, its attention and patch embedding in
    slices, gives exactly what mlx-vlm's encoder gives in one piece."""
    import mlx.core as mx

    from engine_worker import vision

    model = load_model(read_facts(str(tiny_vlm))).model
    r = Prompter(tiny_vlm).request("img", "Describe.", images=[picture(320, 240, 7)])
    whole = model._build(r.prompt, r.media)
    mx.eval(whole.arrays)
    pieces, in_slices = [], vision._encoder_in_slices

    @contextmanager
    def noted(slices):
        with in_slices(slices):
            yield
        pieces.append(len(slices))

    monkeypatch.setattr(vision, "SLICE_MACS", 2**14)
    monkeypatch.setattr(vision, "_encoder_in_slices", noted)
    seq = model.start_encoding(r.prompt, r.media).result()
    assert pieces and pieces[0] > 2
    for a, b in zip(whole.arrays, seq.arrays, strict=True):
        assert mx.array_equal(a, b).item()
    assert seq.delta == whole.delta and seq.delta != 0


def test_text_streams_step_while_an_image_is_encoded(tiny_vlm, monkeypatch):
    """An image request's encoder runs beside the decode steps, a slice a
    step while a text stream decodes: the stream gets tokens on at least as
    many steps as the encoder has slices, and both finish right."""
    from engine_worker import vision

    p = Prompter(tiny_vlm)
    image = p.request("img", "Describe.", images=[picture(320, 240, 3)], max_tokens=4)
    sent, steps_while_encoding, pieces = [], [0], []
    in_slices = vision._encoder_in_slices

    @contextmanager
    def noted(slices):
        with in_slices(slices):
            yield
        pieces.append(len(slices) + 1)  # and the rest of the graph

    monkeypatch.setattr(vision, "SLICE_MACS", 2**18)
    monkeypatch.setattr(vision, "_encoder_in_slices", noted)

    def after_step(prompt_responses, responses):
        if not sent:  # on the loop's thread, once the text stream decodes
            sent.append(image)
            e.submit(image)
        if e._batch.encoding and responses:
            steps_while_encoding[0] += 1

    e = start_engine(tiny_vlm, after_step=after_step)
    try:
        e.submit(p.request("text", "Hello there", max_tokens=400))
        img, text = e.collector.wait("img"), e.collector.wait("text")
    finally:
        e.stop()
    assert pieces[-1] > 4 and steps_while_encoding[0] >= pieces[-1] - 1
    assert img[-1].finish_reason and text[-1].finish_reason


def test_an_image_request_aborted_while_encoded(tiny_vlm, monkeypatch):
    """A media request aborted while its encoder runs (paced, beside a text
    stream) ends as aborted, and its encoding stops before its last slice;
    the next image request is encoded and answered all the same, and the
    engine stops cleanly, its encoder's thread too."""
    from engine_worker import vision

    monkeypatch.setattr(vision, "SLICE_MACS", 2**18)  # well over a hundred slices
    p = Prompter(tiny_vlm)
    first = p.request("img-1", "Describe.", images=[picture(320, 240, 4)], max_tokens=4)
    second = p.request("img-2", "Describe.", images=[picture(160, 120, 5)], max_tokens=4)
    sent, aborted, jobs = [], [], []

    def after_step(prompt_responses, responses):
        if not sent:  # on the loop's thread, once the text stream decodes
            sent.append(first)
            e.submit(first)
        elif e._batch.encoding and e._batch.encoding[0][1].running() and not aborted:
            jobs.append(e._batch.encoding[0][1])
            aborted.append(e.abort("img-1"))
            e.submit(second)

    e = start_engine(tiny_vlm, after_step=after_step)
    try:
        e.submit(p.request("text", "Hello there", max_tokens=600))
        assert e.collector.wait("img-1")[-1].finish_reason == "abort"
        assert e.collector.wait("img-2")[-1].finish_reason == "length"
        assert e.collector.wait("text")[-1].finish_reason == "length"
    finally:
        e.stop()
    assert aborted == [True]
    assert isinstance(jobs[0].exception(timeout=10), vision.EncodingStopped)
    assert e.loaded.model._encoder._thread is None  # joined at the loop's end


def test_an_image_prompt_is_prefilled_on_the_encoders_thread(tiny_vlm):
    """Beside a decoding text stream, an image request's prompt pass runs on
    the encoder's thread: the loop's generator prefills none of its tokens,
    and it answers as the same request run alone does."""
    from engine_worker import mlx_compat

    p = Prompter(tiny_vlm)

    def image():
        return p.request("img", "Describe.", images=[picture(160, 120, 6)], max_tokens=6)

    prefilled_by_loop = []

    def after_step(prompt_responses, responses):
        if responses and not prefilled_by_loop:  # the text stream decodes
            prefilled_by_loop.append(mlx_compat.prompt_tokens(e._batch.gen))
            e.submit(image())

    e = start_engine(tiny_vlm, after_step=after_step)
    try:
        e.submit(p.request("text", "Hello there", max_tokens=200))
        beside_text = tokens_of(e.collector.wait("img"))
        assert mlx_compat.prompt_tokens(e._batch.gen) == prefilled_by_loop[0]
        e.collector.wait("text")
    finally:
        e.stop()
    alone = start_engine(tiny_vlm)
    try:
        assert run(alone, image()) == beside_text
    finally:
        alone.stop()
