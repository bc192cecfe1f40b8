"""Streaming text with stop strings: nothing of a stop string is ever sent, and the deltas add
up to the final text, whatever the token boundaries."""

import pytest

from backbone.tokenizer import Tokenizer
from engine_fixtures import save_tiny_model_with_tokenizer
from server.text_stream import TextStream


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_folder(save_tiny_model_with_tokenizer(tmp_path_factory.mktemp("stream_model")))


def _run(tokenizer, tokens, stop):
    stream = TextStream(tokenizer, stop)
    deltas = []
    for token in tokens:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return deltas, stream


def test_stop_string_across_tokens_is_held_back_then_cut(tokenizer):
    deltas, stream = _run(tokenizer, [5, 6, 7], ["5 w6"])  # text "w5 w6 w7"
    assert deltas[0] == "w"  # "5" might start the stop string: held back
    assert stream.stopped and stream.text == "w"
    assert "".join(deltas) == "w"


def test_false_start_of_a_stop_string_is_released(tokenizer):
    deltas, stream = _run(tokenizer, [5, 6, 7], ["5 w9"])
    assert not stream.stopped
    assert "".join(deltas) == stream.text == "w5 w6 w7"
    assert deltas[0] == "w"


def test_earliest_of_several_stop_strings_wins(tokenizer):
    deltas, stream = _run(tokenizer, [5, 6, 7, 8], ["w8", "6 w"])
    assert stream.text == "w5 w" and "".join(deltas) == "w5 w"


def test_no_stop_strings_streams_everything(tokenizer):
    deltas, stream = _run(tokenizer, [5, 6], [])
    assert deltas == ["w5", " w6", ""] and stream.text == "w5 w6"
