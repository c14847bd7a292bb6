"""Broker message JSON: byte-for-byte what the Go broker writes (wire-vectors section 7)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pulsyflux import Message, MessageError
from pulsyflux.wire import messages
from pulsyflux.wire.messages import decode, decode_body, encode, split_body

from .conftest import WIRE_VECTORS


def _vector_hex(label: str) -> bytes:
    """The hex line following ``label`` in wire-vectors.txt section 7."""
    text = WIRE_VECTORS.read_text()
    section = text[text.index("7) BROKER JSON") : text.index("8) CHUNKING")]
    after = section[section.index(label) :]
    return bytes.fromhex(re.search(r"\n\s+([0-9a-f]+)\n", after).group(1))


FULL = _vector_hex("Message{Topic:")
NIL = _vector_hex("nil Payload / nil Headers")


def test_golden_vectors_encode_exactly():
    assert encode("t", b"hi", {"k": "v"}) == FULL
    assert len(FULL) == 50
    assert encode("t", None, None) == NIL
    assert len(NIL) == 43
    assert encode("t", b"", {}) == b'{"Topic":"t","Payload":"","Headers":{}}'


def test_golden_vectors_decode():
    assert decode(FULL) == Message("t", b"hi", {"k": "v"})
    nil = decode(NIL)
    assert (nil.topic, nil.payload, nil.headers) == ("t", b"", {})


def test_message_encode_writes_empty_headers_as_null_like_a_go_nil_map():
    assert Message("t", b"hi", {"k": "v"}).encode() == FULL
    assert Message("t", b"hi").encode() == b'{"Topic":"t","Payload":"aGk=","Headers":null}'


def test_go_escaping_and_sorted_header_keys():
    body = encode("<a&b>", b"", {"z": "1", "a": "\u2028é"})
    assert body == b'{"Topic":"\\u003ca\\u0026b\\u003e","Payload":"","Headers":{"a":"\\u2028\xc3\xa9","z":"1"}}'
    assert decode(body) == Message("<a&b>", b"", {"a": "\u2028é", "z": "1"})


def test_keys_any_case_and_either_escaping_are_read():
    assert decode(b'{"topic":"<x>","PAYLOAD":"aGk=","hEaDeRs":{"k":"v"}}') == Message("<x>", b"hi", {"k": "v"})
    assert decode(b'{"Topic":"\\u003cx\\u003e"}') == Message("<x>", b"", {})
    # Go: the last of several case variants wins.
    assert decode(b'{"Topic":"a","topic":"b"}').topic == "b"
    assert decode(b' {"Topic":"a", "Payload": "aGk=\\n"} \n') == Message("a", b"hi")


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"", "not a JSON message"),
        (b"[1]", "JSON object"),
        (b'{"Topic":1}', "Topic must be a string"),
        (b'{"Topic":"t","Payload":"aGk"}', "not valid base64"),
        (b'{"Topic":"t","Payload":"a!k="}', "not valid base64"),
        (b'{"Topic":"t","Payload":5}', "Payload must be"),
        (b'{"Topic":"t","Headers":{"k":1}}', "header 'k'"),
        (b'{"Topic":"t","Headers":[]}', "Headers must be"),
        (b'{"Topic":"t"} x', "extra data"),
        (b"\xff", "not a JSON message"),
    ],
)
def test_bad_messages_are_refused_clearly(body, fragment):
    with pytest.raises(MessageError, match=fragment):
        decode_body(body)
    with pytest.raises(MessageError, match=fragment):
        list(split_body(body))


def test_bad_arguments_to_encode():
    with pytest.raises(TypeError, match="topic must be str"):
        encode(b"t", b"")
    with pytest.raises(TypeError, match="payload must be bytes"):
        encode("t", "text")
    with pytest.raises(TypeError, match="headers must map str to str"):
        encode("t", b"", {"k": 1})


def test_batches_keep_each_message_text_unchanged():
    texts = [FULL.decode(), NIL.decode(), '{"topic":"u"}']
    body = messages.encode_batch(texts)
    assert body == b"[" + b",".join(t.encode() for t in texts) + b"]"
    assert [(topic, text) for topic, text, _, _ in split_body(body)] == [
        ("t", texts[0]),
        ("t", texts[1]),
        ("u", texts[2]),
    ]
    assert decode_body(body) == [Message("t", b"hi", {"k": "v"}), Message("t"), Message("u")]
    assert messages.encode_batch(texts[:1]) == FULL  # one message stays plain Go JSON
    assert list(split_body(b" [ ] ")) == []


def test_a_flood_of_distinct_topics_keeps_the_topic_cache_bounded_and_encodings_exact():
    """Topic JSON is cached for speed: many topics, long ones and escaped ones never change a byte or grow it."""
    for i in range(3 * messages._TOPIC_JSON_MAX):
        topic = f"<t&{i}>\u2028"
        assert encode(topic, b"hi", {"k": "v"}) == encode(topic, b"hi", {"k": "v"})  # the second from the cache
        assert len(messages._TOPIC_JSON) <= messages._TOPIC_JSON_MAX
    long_topic = "x" * (messages._TOPIC_JSON_CHARS + 1)
    assert encode(long_topic, None, None) == b'{"Topic":"' + long_topic.encode() + b'","Payload":null,"Headers":null}'
    assert long_topic not in messages._TOPIC_JSON
    assert encode("<a&b>", b"", None) == b'{"Topic":"\\u003ca\\u0026b\\u003e","Payload":"","Headers":null}'
    assert encode("t", b"hi", {"k": "v"}) == FULL


def test_message_is_immutable():
    msg = Message("t", b"x")
    with pytest.raises(AttributeError):
        msg.topic = "u"  # type: ignore[misc]
    assert repr(msg) == "Message(topic='t', payload=b'x', headers={})"


@given(
    topic=st.text(),
    payload=st.binary(max_size=300),
    headers=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
)
def test_round_trip(topic, payload, headers):
    assume_utf8 = all(not (0xD800 <= ord(c) <= 0xDFFF) for c in topic + "".join(headers) + "".join(headers.values()))
    if not assume_utf8:
        return  # Go strings are UTF-8; lone surrogates cannot be sent
    body = encode(topic, payload, headers)
    assert b"<" not in body and b">" not in body and b"&" not in body
    assert decode(body) == Message(topic, payload, headers)
    [(t, text, _, _)] = list(split_body(body))
    assert t == topic and text.encode() == body


def test_the_topic_rule():
    """One rule for every caller (CLI, HTTP, clients, broker): they never disagree."""
    from pulsyflux.wire.messages import MAX_TOPIC_CHARS, check_topic, group_problem, topic_problem

    assert topic_problem("orders") is None
    assert topic_problem("") == "topic must not be empty"
    assert topic_problem("$pulsyflux/x") == "topics starting with '$pulsyflux/' are reserved for the broker"
    # Publishing is not bounded nor scanned (the hot path); subscribing is.
    for topic in ("t" * (MAX_TOPIC_CHARS + 1), "a\x1bb", "a\ud800"):
        assert topic_problem(topic) is None
        assert topic_problem(topic, subscribing=True) is not None
    assert topic_problem("t" * MAX_TOPIC_CHARS, subscribing=True) is None
    # A bidi override would show a subscribed topic reversed in stats, logs and terminals.
    for bidi in ("\u202e", "\u2066", "\u200f", "\u061c"):
        assert topic_problem(f"orders{bidi}.eu", subscribing=True) is not None
        assert group_problem(f"workers{bidi}") is not None
    assert topic_problem("é ü 中 😀 \t", subscribing=False) is None
    assert topic_problem("é ü 中 😀", subscribing=True) is None
    with pytest.raises(TypeError, match="topic must be str, not bytes"):
        check_topic(b"t")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reserved"):
        check_topic("$pulsyflux/subscribe", subscribing=True)


# -- split_body's plain path agrees with the JSON decoder ------------------------------

_PLAIN_CASES = [
    messages.encode_text("t", b"xy", None),
    messages.encode_text("orders.eu", b"", None),
    messages.encode_text("a/b", None, {}),
    messages.encode_text("", b"x", None),  # the empty topic: the topic rule refuses it later
    messages.encode_text("t\x7f~", b"\xff" * 7, None),
    messages.encode_batch([messages.encode_text("t", b"%d" % i, None) for i in range(50)]),
    messages.encode_batch([messages.encode_text("t", b"x", None), messages.encode_text("u", None, None)]),
]
_NOT_PLAIN = [
    b"[]",
    b' {"Topic":"t","Payload":"eHk=","Headers":null}',  # whitespace
    b'{"Topic":"t","Payload":"eHk=","Headers":null} ',
    b'[{"Topic":"t","Payload":"eHk=","Headers":null} ]',
    b'{"Topic":"t\\u0041","Payload":"eHk=","Headers":null}',  # an escape
    '{"Topic":"été","Payload":"eHk=","Headers":null}'.encode(),  # not ASCII
    b'{"Topic":"t","Payload":"eHk=","Headers":{"k":"v"}}',
    b'{"topic":"t","payload":"eHk=","headers":null}',  # Go reads keys in any case
    b'{"Topic":"t","Headers":null,"Payload":"eHk="}',
    b'{"Topic":"t","Payload":"eHk","Headers":null}',  # bad padding
    b'{"Topic":"t","Payload":"eH=k","Headers":null}',
    b'{"Topic":"t","Payload":"e\\nHk=","Headers":null}',
    b'{"Topic":"t","Payload":"eHk=","Headers":null}{"Topic":"t","Payload":"eHk=","Headers":null}',
    b'[{"Topic":"t","Payload":"eHk=","Headers":null},]',
    b'[{"Topic":"t","Payload":"eHk=","Headers":null}',
    b'[{"Topic":"t","Payload":"eHk=","Headers":null}]]',
    b'[{"Topic":"t","Payload":"eHk=","Headers":null};{"Topic":"t","Payload":"eHk=","Headers":null}]',
    b'{"Topic":"t\x01","Payload":"eHk=","Headers":null}',  # a control character: not JSON
    b'{"Topic":"t","Payload":1,"Headers":null}',
]


@pytest.mark.parametrize("text", _PLAIN_CASES)
def test_a_plain_body_is_split_as_the_json_decoder_splits_it(text):
    body = text.encode() if isinstance(text, str) else text
    plain = messages._split_plain(body)
    assert plain is not None and plain == messages._split_json(body) == messages.split_body(body)


@pytest.mark.parametrize("body", _NOT_PLAIN)
def test_any_other_body_takes_the_json_decoder_and_its_answer(body):
    assert messages._split_plain(body) is None
    try:
        expected = messages._split_json(body)
    except messages.MessageError as error:
        with pytest.raises(messages.MessageError) as raised:
            messages.split_body(body)
        assert str(raised.value) == str(error)
    else:
        assert messages.split_body(body) == expected
