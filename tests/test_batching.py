"""batching_parameters.txt beside the versions (gbp_rewrite.serving.batching, issue 16 part 5).

The file is parsed with protobuf's text format against BatchingParameters as declared in
tensorflow_serving/servables/tensorflow/session_bundle_config.proto (rebuilt here: the pip package
does not ship that proto), so a field the server does not know fails the test.
"""

from __future__ import annotations

import os

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

import gbp_rewrite
from gbp_rewrite.serving import batching

MODEL = "shapes_cnn"


def batching_parameters_class():
    """TF Serving's BatchingParameters message (the fields its text files use)."""
    file = descriptor_pb2.FileDescriptorProto(name="tfs_batching_test.proto", package="tensorflow.serving",
                                              dependency=["google/protobuf/wrappers.proto"], syntax="proto3")
    message = file.message_type.add(name="BatchingParameters")
    optional, repeated = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    wrapper = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
    for number, (name, type_name) in enumerate([
            ("max_batch_size", ".google.protobuf.Int64Value"), ("batch_timeout_micros", ".google.protobuf.Int64Value"),
            ("max_enqueued_batches", ".google.protobuf.Int64Value"), ("num_batch_threads", ".google.protobuf.Int64Value"),
            ("thread_pool_name", ".google.protobuf.StringValue")], start=1):
        message.field.add(name=name, number=number, label=optional, type=wrapper, type_name=type_name)
    message.field.add(name="allowed_batch_sizes", number=6, label=repeated,
                      type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64)
    message.field.add(name="pad_variable_length_inputs", number=7, label=optional,
                      type=descriptor_pb2.FieldDescriptorProto.TYPE_BOOL)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


def parse(text: str):
    return text_format.Parse(text, batching_parameters_class()())


def test_convert_with_a_version_writes_a_measured_suggestion(zoo, tmp_path):
    base = tmp_path / "shapes"
    report = gbp_rewrite.convert(zoo.model(MODEL), base, version=1)
    params = parse((base / "batching_parameters.txt").read_text())
    assert params.max_batch_size.value in (1, 8)
    assert list(params.allowed_batch_sizes)[-1] == params.max_batch_size.value
    assert params.num_batch_threads.value == os.cpu_count()
    assert "batching_parameters.txt suggests max_batch_size" in report.checks["batching"]
    assert "--enable_batching --batching_parameters_file" in (base / "batching_parameters.txt").read_text()


def test_no_version_no_batching_file(zoo, tmp_path):
    _, report = zoo.converted(MODEL)
    assert "batching" not in report.checks


def test_an_existing_file_is_kept_unless_overwrite(zoo, tmp_path):
    base = tmp_path / "shapes"
    base.mkdir()
    (base / "batching_parameters.txt").write_text("max_batch_size { value: 32 }\n")
    gbp_rewrite.convert(zoo.model(MODEL), base, version=1)
    assert (base / "batching_parameters.txt").read_text() == "max_batch_size { value: 32 }\n"
    gbp_rewrite.convert(zoo.model(MODEL), base, version=1, overwrite=True)
    assert parse((base / "batching_parameters.txt").read_text()).max_batch_size.value in (1, 8)


@pytest.mark.parametrize("single, batch, max_batch, timeout", [
    (0.010, 0.040, 8, 5000),   # a batch of 8 costs 4 single calls: batching pays
    (0.010, 0.080, 1, 0),      # no gain at all
    (0.010, 0.070, 1, 0),      # 12.5% per example: below the 15% bar
    (0.010, 0.066, 8, 5000),   # 17.5%: pays
])
def test_suggestion_follows_the_measured_ratio(single, batch, max_batch, timeout):
    params = parse(batching.suggestion(single, batch, cores=2))
    assert params.max_batch_size.value == max_batch
    assert params.batch_timeout_micros.value == timeout
    assert list(params.allowed_batch_sizes) == [s for s in (1, 2, 4, 8) if s <= max_batch]
    assert params.num_batch_threads.value == 2 and not params.pad_variable_length_inputs


def test_measure_takes_the_median_warm_call_at_batch_1_and_8(monkeypatch):
    """A fake clock that each call of the fake signature advances by a known cost: the warm-up call of
    each shape costs 100x more (as the first run of a graph does) and must not count."""
    import tensorflow as tf

    from gbp_rewrite.graph.savedmodel import TensorDesc

    now, seen = [0.0], []
    cost = {1: [0.010, 0.011, 0.009, 0.010, 0.012], batching.LARGE_BATCH: [0.030, 0.041, 0.040, 0.039, 0.050]}

    def signature(*, image):
        size = int(image.shape[0])
        first = size not in seen
        seen.append(size)
        now[0] += 1.0 if first else cost[size].pop(0)

    monkeypatch.setattr(batching.time, "perf_counter", lambda: now[0])
    inputs = {"image": TensorDesc("image", "image:0", tf.float32, (None, 4, 4, 3))}
    single, batch = batching.measure(signature, inputs, rounds=5)
    assert (single, batch) == pytest.approx((0.010, 0.040))
    assert sorted(set(seen)) == [1, batching.LARGE_BATCH] and len(seen) == 12
