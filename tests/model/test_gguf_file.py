"""kvserve's GGUF reader against gguf's own GGUFReader: the same metadata values and the same
tensor views, on a file holding every value type; and every damaged file is a ValueError, never
another exception, a hang or a huge allocation."""

import struct

import gguf
import numpy as np
import pytest

from kvserve.model.gguf_file import GGUFFile
from kvserve.model.loader import ModelLoadError, open_gguf

V = gguf.GGUFValueType


def write_sample(path) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 1e-5)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "naïve — 日本語 😀")
    writer.add_array("t.strings", ["", "a", "Ġthe", "<|im_end|>", "é"])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_key_value("t.nested", [[1, 2], [3]], V.ARRAY)
    writer.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("f16", np.linspace(-1, 1, 64, dtype=np.float16).reshape(2, 32))
    q8 = gguf.quants.quantize(np.linspace(-2, 2, 128, dtype=np.float32).reshape(2, 64), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "sample.gguf"
    write_sample(path)
    return path


def test_same_fields_and_tensors_as_gguf_reader(sample):
    ours, reference = GGUFFile(sample), gguf.GGUFReader(sample)
    expected = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    expected["t.nested"] = [[1, 2], [3]]     # GGUFReader.contents() flattens arrays of arrays
    assert ours.fields == expected
    assert ours.fields["t.str"] == "naïve — 日本語 😀" and ours.fields["t.nested"] == [[1, 2], [3]]
    assert ours.fields["t.u64"] == 2**63 + 5 and ours.fields["t.bool"] is True
    assert [t.name for t in ours.tensors] == ["f32", "f16", "q8"]
    for a, b in zip(ours.tensors, reference.tensors):
        assert (a.name, a.tensor_type, list(a.shape), a.n_elements, a.n_bytes) == \
               (b.name, b.tensor_type, list(b.shape), b.n_elements, b.n_bytes)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data, b.data)
    values = gguf.quants.dequantize(ours.tensors[2].data, ours.tensors[2].tensor_type)
    np.testing.assert_allclose(values, np.linspace(-2, 2, 128).reshape(2, 64), atol=0.02)


def test_every_truncation_is_a_value_error(sample):
    data = sample.read_bytes()
    last = gguf.GGUFReader(sample).tensors[-1]
    cut = sample.with_name("cut.gguf")
    for end in list(range(0, last.data_offset + last.n_bytes, 7)) + [last.data_offset + last.n_bytes - 1]:
        cut.write_bytes(data[:end])
        with pytest.raises(ValueError):
            GGUFFile(cut)


def test_hostile_counts_and_types_are_value_errors(tmp_path):
    def header(tensors, fields):
        return b"GGUF" + struct.pack("<IQQ", 3, tensors, fields)

    def key(name, kind):
        raw = name.encode()
        return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", kind)

    cases = {
        "a billion strings": header(0, 1) + key("k", 9) + struct.pack("<IQ", 8, 10**9),
        "a string of 2^63 bytes": header(0, 1) + key("k", 8) + struct.pack("<Q", 2**63),
        "an unknown value type": header(0, 1) + key("k", 99),
        "an array of unknown type": header(0, 1) + key("k", 9) + struct.pack("<IQ", 77, 1),
        "2^60 metadata entries": header(0, 2**60),
        "a tensor with 1000 dimensions": header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 1000),
        "a tensor past the end": header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 10**6, 0, 0),
        "an unknown tensor type": header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 4, 999, 0),
        "version 1": b"GGUF" + struct.pack("<IQQ", 1, 0, 0),
        "big-endian": b"GGUF" + struct.pack(">IQQ", 3, 0, 0),
        "no magic": b"GGML" + bytes(20),
        "empty": b"",
    }
    for name, raw in cases.items():
        path = tmp_path / "bad.gguf"
        path.write_bytes(raw)
        with pytest.raises(ValueError):
            GGUFFile(path)
    path.write_bytes(cases["a billion strings"])
    with pytest.raises(ModelLoadError, match="truncated GGUF file"):
        open_gguf(path)
