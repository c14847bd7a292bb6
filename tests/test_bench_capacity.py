"""The capacity benchmark's own arithmetic (benchmarks never run in the test suite)."""

from __future__ import annotations

from pulsyflux.bench import capacity
from pulsyflux.wire import messages


def test_a_forward_is_counted_without_decoding_and_control_messages_are_not_messages():
    texts = [messages.encode_text("t", b"x" * n, None) for n in (0, 1, 100)]
    assert capacity.count_forward(messages.encode_batch(texts)) == (3, -1)
    assert capacity.count_forward(messages.encode_batch(texts[:1])) == (1, -1)  # one message: a plain object
    notice = messages.control(messages.DROPPED, dropped="41")
    assert capacity.count_forward(messages.encode_batch([notice, *texts])) == (3, 41)
    assert capacity.count_forward(messages.control(messages.PROBE).encode()) == (0, -1)


def test_a_step_has_settled_when_its_last_readings_agree():
    assert not capacity.settled([])
    assert not capacity.settled([1.0, 1.0])  # too few
    assert not capacity.settled([1.0, None, 1.0])  # a reading without deliveries
    assert capacity.settled([5.0, 1.0, 1.05, 1.08])  # the JIT's first second is left behind
    assert not capacity.settled([1.0, 1.0, 1.2])  # still moving by 20%


def test_the_window_and_the_batch_shrink_with_the_subscribers_and_the_size():
    options = capacity.Options()
    assert capacity._window(options, 1, 100) == options.window
    few, many = capacity._window(options, 100, 100), capacity._window(options, 10_000, 100)
    assert few > many >= 16
    assert capacity._publish_batch(options, options.window, 100) == options.publish_batch
    assert capacity._publish_batch(options, many, 100) <= many // (2 * options.publishers)
    assert capacity._publish_batch(options, options.window, 100_000) == 1  # 256 KiB per request at most


def test_a_binary_forward_is_counted_by_its_length_and_a_drop_notice_read_with_the_codec():
    record = messages.encode_record("t", b"x" * 100, None)
    body = messages.encode_records([record] * 5)
    assert capacity.count_forward(body, len(record)) == (5, -1)
    notice = messages.encode_record(messages.DROPPED, None, {"dropped": "7"})
    assert capacity.count_forward(messages.encode_records([notice, record, record]), len(record)) == (2, 7)
    assert capacity.count_forward(messages.encode_records([])) == (0, -1)
