"""`make images`: build genmesh's four images (services/*/Dockerfile) with Podman, or Docker.

    .venv/bin/python -m deploy.podman.images [--base auto|registry|local|IMAGE] [--only NAME]

The base image is the Dockerfiles' BASE_IMAGE build argument, chosen by --base (or the
IMAGE_BASE environment variable, as in `make images IMAGE_BASE=local`):

  auto      (default) the registry's python:3.11-slim if it is present or can be pulled, else
            `local`: right for a laptop with Docker Hub and for this project's machines,
            which reach no registry.
  registry  python:3.11-slim from Docker Hub; fail if it cannot be pulled.
  local     localhost/genmesh-base:bookworm, built once with debootstrap from Debian's
            packages (Debian bookworm minbase + python3 3.11, python3-venv, python3-pip,
            ca-certificates; about 90 s, needs root and debootstrap) and reused after.
  IMAGE     any other value is used as the base as it is (it needs Python 3.11 as `python3`).

Each image is tagged <repo>:src-<hash>, where the hash covers the Dockerfile, every file its
COPY lines take from the build context, and the base image's id, and also <repo>:dev (the tag
the dev overlay runs). An image whose src tag exists is not rebuilt, so a second run on an
unchanged tree takes seconds. Build logs go to .run/images/<name>.log.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from deploy.podman.engine import REPO, CommandError, Engine, EngineError, find_engine

SERVICES = ("quota", "telemetry", "generation", "gateway")
REGISTRY_BASE = "python:3.11-slim"
LOCAL_BASE = "genmesh-base:bookworm"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# pip inside a build trusts the host's CA bundle (it may hold a proxy's CA), mounted for the
# build only (Podman), never baked into an image.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LOG_DIR = REPO / ".run" / "images"
# Never part of an image's content (the .dockerignore leaves them out too).
SKIPPED_PARTS = {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
BASE_MODES = ("auto", "registry", "local")


def say(message: str) -> None:
    print(message, flush=True)  # noqa: T201 - a command-line tool


def qualified(engine: Engine, name: str) -> str:
    """Podman files unqualified local images under localhost/; say so explicitly."""
    return f"localhost/{name}" if engine.is_podman else name


def registry_ref(engine: Engine) -> str:
    # Podman refuses to guess a registry for a short name without a terminal to ask on.
    return f"docker.io/library/{REGISTRY_BASE}" if engine.is_podman else REGISTRY_BASE


@dataclass(frozen=True)
class Base:
    ref: str
    why: str


@dataclass(frozen=True)
class Image:
    service: str
    ref: str  # <repo>:src-<hash>, the content-addressed tag
    dev_ref: str  # <repo>:dev
    built: bool
    seconds: float


# -- the base image ---------------------------------------------------------------------------


def _pull(engine: Engine, ref: str) -> str | None:
    """None when pulled, else why not."""
    result = engine.run("pull", "--quiet", ref, check=False, timeout=900)
    if result.returncode == 0:
        return None
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {result.returncode}"


def build_local_base(engine: Engine) -> str:
    """localhost/genmesh-base:bookworm from Debian's packages, with debootstrap."""
    ref = qualified(engine, LOCAL_BASE)
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise EngineError(
            f"the local base image {ref} is missing and debootstrap, which builds it, is not "
            "installed: `sudo apt-get install -y debootstrap` (or IMAGE_BASE=registry where "
            "Docker Hub is reachable)"
        )
    if os.geteuid() != 0:
        raise EngineError(
            f"building the local base image {ref} with debootstrap needs root: run "
            "`sudo make images` once (later builds reuse it), or IMAGE_BASE=registry"
        )
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / "base.log"
    workdir = Path(tempfile.mkdtemp(prefix="genmesh-rootfs-", dir="/var/tmp"))
    rootfs = workdir / "rootfs"
    mirror = os.environ.get("DEBOOTSTRAP_MIRROR", "")
    say(f"    debootstrap {DEBIAN_SUITE} (minbase + {', '.join(DEBIAN_PACKAGES)}), about 90 s ...")
    began = time.monotonic()
    try:
        with log.open("w") as out:
            argv = [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(DEBIAN_PACKAGES)}",
                DEBIAN_SUITE,
                str(rootfs),
                *([mirror] if mirror else []),
            ]
            done = subprocess.run(  # noqa: S603 - debootstrap with our own arguments
                argv, stdout=out, stderr=subprocess.STDOUT, check=False, timeout=1800
            )
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise EngineError(f"debootstrap failed (exit {done.returncode}; {log}):\n{tail}")
        # Nothing of the host's apt state or caches belongs in the image.
        shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        tar = subprocess.Popen(  # noqa: S603 - tar with our own arguments
            ["tar", "-C", str(rootfs), "-c", "."],  # noqa: S607 - tar from PATH
            stdout=subprocess.PIPE,
        )
        imported = subprocess.run(  # noqa: S603 - the engine with our own arguments
            [engine.binary, "import", "--change", f"ENV=PATH={BASE_PATH}", "-", ref],
            stdin=tar.stdout,
            env=engine.env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        if tar.stdout is not None:
            tar.stdout.close()
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise EngineError(f"importing the Debian root filesystem failed: {imported.stderr}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"    built {ref} in {time.monotonic() - began:.0f}s")
    return ref


def resolve_base(engine: Engine, mode: str) -> Base:
    mode = mode.strip() or "auto"
    if mode not in BASE_MODES:
        if engine.image_exists(mode) or _pull(engine, mode) is None:
            return Base(mode, "IMAGE_BASE")
        raise EngineError(f"the base image {mode!r} (IMAGE_BASE) is not present and not pullable")
    if mode in ("auto", "registry"):
        ref = registry_ref(engine)
        if engine.image_exists(ref):
            return Base(ref, "the registry's, already present")
        failure = _pull(engine, ref)
        if failure is None:
            return Base(ref, "the registry's, pulled")
        if mode == "registry":
            raise EngineError(
                f"cannot pull {ref} ({failure}): use IMAGE_BASE=local to build a Debian base "
                "with debootstrap"
            )
        say(f"    {ref} cannot be pulled ({failure}): using the local Debian base")
    local = qualified(engine, LOCAL_BASE)
    if engine.image_exists(local):
        return Base(local, f"local Debian {DEBIAN_SUITE} (debootstrap), already built")
    return Base(build_local_base(engine), f"local Debian {DEBIAN_SUITE}, built with debootstrap")


# -- content hashes ---------------------------------------------------------------------------


def logical_lines(text: str) -> Iterator[str]:
    """Dockerfile instructions, with backslash continuations joined and comments dropped."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def copy_sources(dockerfile: Path) -> list[str]:
    """What the Dockerfile's COPY/ADD lines take from the build context (not --from stages)."""
    sources: list[str] = []
    for line in logical_lines(dockerfile.read_text()):
        words = shlex.split(line)
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = words[1:]
        if any(a.startswith("--from") for a in args):
            continue
        paths = [a for a in args if not a.startswith("--")]
        sources.extend(paths[:-1])
    return sources


def context_files(sources: Iterable[str]) -> list[Path]:
    files: set[Path] = set()
    for source in sources:
        path = REPO / source
        if path.is_file():
            files.add(path)
        elif path.is_dir():
            files.update(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not SKIPPED_PARTS & set(p.relative_to(REPO).parts)
                and p.suffix != ".pyc"
            )
        else:
            raise EngineError(f"{source}, copied by a Dockerfile, does not exist")
    return sorted(files)


def source_hash(service: str, base_id: str) -> str:
    dockerfile = REPO / "services" / service / "Dockerfile"
    digest = hashlib.sha256()
    digest.update(f"base {base_id}\n".encode())
    for path in [dockerfile, REPO / ".dockerignore", *context_files(copy_sources(dockerfile))]:
        if not path.exists():
            continue
        digest.update(f"{path.relative_to(REPO)}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


# -- building ---------------------------------------------------------------------------------


def repository(engine: Engine, service: str) -> str:
    return qualified(engine, f"genmesh/{service}")


def build_image(engine: Engine, service: str, base: str, verbose: bool = False) -> Image:
    began = time.monotonic()
    digest = source_hash(service, engine.image_id(base))
    repo = repository(engine, service)
    ref, dev_ref = f"{repo}:src-{digest}", f"{repo}:dev"
    if engine.image_exists(ref):
        engine.run("tag", ref, dev_ref)
        return Image(service, ref, dev_ref, built=False, seconds=time.monotonic() - began)
    args = [
        "build",
        "--file",
        f"services/{service}/Dockerfile",
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--label",
        f"genmesh.source-hash={digest}",
        "--tag",
        ref,
        "--tag",
        dev_ref,
    ]
    if engine.is_podman:
        args.append("--layers")
        if HOST_CA_BUNDLE.exists():
            args += ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    args.append(".")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{service}.log"
    with log.open("w") as out:
        done = subprocess.run(  # noqa: S603 - the engine with our own arguments
            [engine.binary, *args],
            cwd=REPO,
            env=engine.env(),
            stdout=None if verbose else out,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=1800,
        )
    if done.returncode != 0:
        tail = "" if verbose else log.read_text(errors="replace")[-3000:]
        raise CommandError(f"building {ref} failed (exit {done.returncode}; log {log}):\n{tail}")
    return Image(service, ref, dev_ref, built=True, seconds=time.monotonic() - began)


def build_all(
    engine: Engine,
    base_mode: str | None = None,
    services: Iterable[str] = SERVICES,
    verbose: bool = False,
) -> dict[str, Image]:
    """Every image (or those named), built unless the current tree's is present."""
    mode = base_mode if base_mode is not None else os.environ.get("IMAGE_BASE", "auto")
    base = resolve_base(engine, mode)
    say(f"==> base image {base.ref} ({base.why})")
    images: dict[str, Image] = {}
    for service in services:
        image = build_image(engine, service, base.ref, verbose)
        what = f"built in {image.seconds:.1f}s" if image.built else "up to date"
        say(f"    {service:<11} {image.ref}  ({what}; also {image.dev_ref.rsplit(':', 1)[1]})")
        images[service] = image
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base",
        default=os.environ.get("IMAGE_BASE", "auto"),
        help="auto (default), registry, local, or an image reference ($IMAGE_BASE)",
    )
    parser.add_argument("--only", action="append", choices=SERVICES, help="build only these")
    parser.add_argument("--verbose", action="store_true", help="show the build output")
    args = parser.parse_args(argv)
    began = time.monotonic()
    try:
        engine = find_engine()
        version = engine.run("--version").stdout.strip()
        conf = engine.env().get("CONTAINERS_CONF") if engine.is_podman else None
        say(f"==> {version}" + (f" (CONTAINERS_CONF={conf})" if conf else ""))
        build_all(engine, args.base, args.only or SERVICES, args.verbose)
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    except CommandError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201
        return 1
    say(f"==> images ready in {time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
