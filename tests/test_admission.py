"""The admission policy over plain data: requests are ids (and a media flag,
a prompt and its block keys), time is a clock the test moves, memory is a
number."""

from dataclasses import dataclass, field

from engine_worker.admission import (
    IDLE_GATHER_GAP_S,
    IDLE_WAIT_S,
    MEDIA_HOLD_MAX_S,
    Admission,
    BatchState,
)


@dataclass
class R:
    request_id: str
    media: list = field(default_factory=list)
    prompt: list[int] = field(default_factory=lambda: [1, 2, 3])
    prefix_keys: list[int] = field(default_factory=list)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def policy(window: float = 0.003, max_num_seqs: int = 32, prefill: int = 8):
    clock = Clock()
    return Admission(max_num_seqs, prefill, window, clock), clock


def ids(decision) -> list[str]:
    return [r.request_id for r in decision.admit]


def free(r) -> int:
    return 1


def roomy(total: int) -> bool:
    return True


def test_a_trickle_joins_in_whole_prefill_batches_within_the_window():
    p, clock = policy(window=0.01)
    batch = BatchState(running=1)
    admitted = []
    for i in range(4):  # two arrivals per step
        p.add(R(f"{2 * i}"))
        p.add(R(f"{2 * i + 1}"))
        admitted.append(ids(p.choose(batch, free, roomy)))
        clock.now += 0.001
    assert admitted == [[], [], [], [str(i) for i in range(8)]]
    # Two more, then the window passes: they join without a whole batch.
    p.add(R("8"))
    p.add(R("9"))
    assert ids(p.choose(batch, free, roomy)) == []
    clock.now += 0.011
    p.add(R("10"))
    assert ids(p.choose(batch, free, roomy)) == ["8", "9", "10"]


def test_no_new_arrival_means_no_hold():
    p, _ = policy()
    p.add(R("a"))
    assert ids(p.choose(BatchState(running=1), free, roomy)) == []  # it just arrived
    assert ids(p.choose(BatchState(running=1), free, roomy)) == ["a"]  # a step without arrivals


def test_an_idle_engine_gathers_then_a_lone_user_is_not_held():
    p, _ = policy(window=60.0)
    p.add(R("first"))
    assert ids(p.choose(BatchState(), free, roomy)) == []
    assert p.idle_wait_s() == IDLE_GATHER_GAP_S  # the hold: check again soon
    assert ids(p.choose(BatchState(), free, roomy)) == ["first"]
    assert p.idle_wait_s() == IDLE_WAIT_S
    p.batch_emptied()  # a spell of one request at a time ended
    p.add(R("second"))
    assert ids(p.choose(BatchState(), free, roomy)) == ["second"]
    p.batch_emptied()
    # A burst after it: its first request starts at once, the rest gather.
    p.add(R("b0"))
    assert ids(p.choose(BatchState(), free, roomy)) == ["b0"]
    p.add(R("b1"))
    p.add(R("b2"))
    assert ids(p.choose(BatchState(running=1), free, roomy)) == []
    assert ids(p.choose(BatchState(running=1), free, roomy)) == ["b1", "b2"]
    p.batch_emptied()  # that spell ran three at once: the next first arrival is held
    p.add(R("c0"))
    assert ids(p.choose(BatchState(), free, roomy)) == []


def test_a_burst_waits_a_step_while_the_prefill_batch_turns_unless_it_fits_beside():
    p, _ = policy(window=0.0)
    turning = BatchState(running=2, prefilling=5, prefill_turning=True)
    for i in range(4):
        p.add(R(f"{i}"))
    assert ids(p.choose(turning, free, roomy)) == []  # 4 > 8 - 5
    assert ids(p.choose(BatchState(running=7), free, roomy)) == ["0", "1", "2", "3"]
    for i in range(3):
        p.add(R(f"x{i}"))
    assert ids(p.choose(turning, free, roomy)) == ["x0", "x1", "x2"]  # 3 fit beside


def test_media_joins_one_per_step_after_text_first_tokens_and_is_not_starved():
    p, clock = policy(window=0.0)
    for r in (R("img-0", [1]), R("img-1", [1]), R("text")):
        p.add(r)
    assert ids(p.choose(BatchState(running=1), free, roomy)) == ["text"]
    waiting_text = BatchState(running=2, text_awaiting_first=True)
    assert ids(p.choose(waiting_text, free, roomy)) == []
    assert ids(p.choose(BatchState(running=2), free, roomy)) == ["img-0"]
    assert ids(p.choose(BatchState(running=3), free, roomy)) == ["img-1"]
    # Steady text: one always awaits its first token; the image joins after the hold.
    p.add(R("img-2", [1]))
    assert ids(p.choose(waiting_text, free, roomy)) == []
    clock.now += MEDIA_HOLD_MAX_S / 2
    p.add(R("t"))
    assert ids(p.choose(waiting_text, free, roomy)) == ["t"]
    clock.now += MEDIA_HOLD_MAX_S / 2
    assert ids(p.choose(waiting_text, free, roomy)) == ["img-2"]


def test_one_media_request_encodes_at_a_time_and_text_passes_it():
    p, clock = policy(window=0.0)
    for r in (R("img-0", [1]), R("img-1", [1]), R("text")):
        p.add(r)
    encoding = BatchState(running=1, encoding=True)
    assert ids(p.choose(encoding, free, roomy)) == ["text"]
    assert ids(p.choose(encoding, free, roomy)) == []
    assert ids(p.choose(BatchState(running=2), free, roomy)) == ["img-0"]
    assert ids(p.choose(BatchState(running=3, encoding=True), free, roomy)) == []
    assert ids(p.choose(BatchState(running=3), free, roomy)) == ["img-1"]


def test_memory_a_request_waits_for_room_or_is_refused_when_it_never_fits():
    p, _ = policy(window=0.0)
    sizes = {"small": 10, "big": 80, "huge": 1000}
    for rid in ("small", "big", "huge"):
        p.add(R(rid))

    def fits(total: int) -> bool:
        return total <= 100

    def cost(r) -> int:
        return sizes[r.request_id]

    busy = BatchState(running=1, kv_reserved=50)
    assert ids(p.choose(busy, cost, fits)) == ["small"]
    decision = p.choose(busy, cost, fits)
    assert ids(decision) == [] and not decision.too_large  # big waits for room
    decision = p.choose(BatchState(), cost, fits)
    assert ids(decision) == ["big"] and not decision.too_large
    decision = p.choose(BatchState(), cost, fits)  # huge alone cannot fit: refused
    assert ids(decision) == [] and [(r.request_id, n) for r, n in decision.too_large] == [
        ("huge", 1000)]
    assert not p.waiting


def test_the_batch_never_exceeds_max_num_seqs_and_aborts_leave_the_queue():
    p, _ = policy(window=0.0, max_num_seqs=4)
    for i in range(6):
        p.add(R(f"{i}"))
    assert p.remove("1").request_id == "1" and p.remove("1") is None
    assert ids(p.choose(BatchState(running=1), free, roomy)) == ["0", "2", "3"]
    assert ids(p.choose(BatchState(running=4), free, roomy)) == []
    assert ids(p.choose(BatchState(running=3), free, roomy)) == ["4"]


def prompt_of(shared: list[int], own: int, seed: int) -> R:
    """A request whose prompt is `shared` followed by `own` tokens of its own."""
    from engine_worker.blocks import block_keys

    prompt = shared + [1000 * seed + i for i in range(own)]
    return R(f"p{seed}", prompt=prompt, prefix_keys=block_keys(prompt[:-1]))


def test_requests_sharing_most_of_a_prompt_wait_for_its_prefill():
    from engine_worker.blocks import block_keys

    p, _ = policy(window=0.0)
    shared = list(range(1000))
    burst = [prompt_of(shared, 16, i) for i in range(4)]
    other = R("other", prompt=list(range(5000, 5100)), prefix_keys=block_keys(
        list(range(5000, 5099))))
    for r in (*burst, other):
        p.add(r)
    # The first goes; the others would prefill its 1,000 tokens again: they
    # wait, and a request that shares nothing goes ahead of them.
    assert ids(p.choose(BatchState(), free, roomy)) == ["p0", "other"]
    prefilling = BatchState(running=2, prefilling=2, prefill_keys=set(burst[0].prefix_keys))
    assert ids(p.choose(prefilling, free, roomy)) == []
    # Its pass has run: the prefix cache holds the prefix; they join, together.
    assert ids(p.choose(BatchState(running=2), free, roomy, lambda r: 62)) == ["p1", "p2", "p3"]


def test_a_request_does_not_wait_to_save_less_than_half_its_prefill():
    p, _ = policy(window=0.0)
    shared = list(range(64))
    leader, follower = prompt_of(shared, 500, 0), prompt_of(shared, 500, 1)
    p.add(follower)
    batch = BatchState(running=1, prefill_keys=set(leader.prefix_keys))
    assert ids(p.choose(batch, free, roomy)) == ["p1"]  # 64 shared of 564: not worth a wait
    # Shared beyond what the cache holds is what counts: 1,000 tokens shared
    # with a pass, but 960 of them cached already.
    shared = list(range(1000))
    leader, follower = prompt_of(shared, 200, 2), prompt_of(shared, 200, 3)
    p.add(follower)
    batch = BatchState(running=1, prefill_keys=set(leader.prefix_keys[60:]))
    assert ids(p.choose(batch, free, roomy, lambda r: 60)) == ["p3"]
    p.add(prompt_of(shared, 200, 4))
    assert ids(p.choose(batch, free, roomy, lambda r: 0)) == []  # nothing cached: it waits
