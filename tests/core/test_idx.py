"""IDX parsing: the valid format and each way a file can be broken."""

import gzip

import numpy as np
import pytest

from stages.core.idx import IdxError, parse_idx, read_idx
from tests.conftest import encode_idx


def test_reads_images_and_labels(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(encode_idx(images)))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(encode_idx(np.array([3, 7], dtype=np.uint8)))
    )
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "train-labels-idx1-ubyte.gz"), [3, 7])


def test_truncated_gzip_names_the_file(tmp_path):
    data = gzip.compress(encode_idx(np.zeros((5, 28, 28), np.uint8)))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IdxError, match=r"t10k-images-idx3-ubyte.gz: truncated gzip"):
        read_idx(path)


def test_not_gzip(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(IdxError, match="t10k-labels-idx1-ubyte.gz: not a valid gzip"):
        read_idx(path)


def test_wrong_magic_number():
    data = encode_idx(np.zeros(4, np.uint8))  # a labels file where images are expected
    with pytest.raises(
        IdxError, match=r"train-images-idx3-ubyte: wrong IDX magic number 0x00000801"
    ):
        parse_idx(data, "train-images-idx3-ubyte")


def test_wrong_dimensions():
    data = encode_idx(np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(IdxError, match="wrong image dimensions 32x32, expected 28x28"):
        parse_idx(data, "train-images-idx3-ubyte")


def test_payload_shorter_than_header_promises():
    data = encode_idx(np.zeros((3, 28, 28), np.uint8))[:-10]
    with pytest.raises(IdxError, match="header promises 3 items"):
        parse_idx(data, "train-images-idx3-ubyte")


def test_too_short_for_header():
    with pytest.raises(IdxError, match="too short for an IDX header"):
        parse_idx(b"\x00\x00\x08\x01\x00", "train-labels-idx1-ubyte")


def test_a_four_byte_file_is_judged_by_its_magic_number():
    with pytest.raises(IdxError, match="wrong IDX magic number 0x00000899, expected 0x00000801"):
        parse_idx(b"\x00\x00\x08\x99", "t10k-labels-idx1-ubyte")
    with pytest.raises(IdxError, match="only 4 bytes, too short for an IDX header"):
        parse_idx(b"\x00\x00\x08\x01", "t10k-labels-idx1-ubyte")


def test_an_error_page_saved_as_a_download_shows_its_magic_unsigned():
    png = b"\x89PNG\r\n\x1a\n" + bytes(16)
    with pytest.raises(IdxError, match="wrong IDX magic number 0x89504e47, expected 0x00000803"):
        parse_idx(png, "train-images-idx3-ubyte")


def test_a_file_of_zero_items_is_only_its_header():
    labels = parse_idx(b"\x00\x00\x08\x01" + bytes(4), "t10k-labels-idx1-ubyte")
    assert labels.shape == (0,) and labels.dtype == np.uint8
