#!/usr/bin/env python3
"""Builds Flotilla's container images as OCI archives, without Docker or a registry.

Each image is one uncompressed layer: the workspace's binaries, the shared libraries they link
(as `ldd` finds them on this machine), a minimal /etc (passwd and group with the nonroot user
65532, CA certificates) and an empty /tmp. The image configuration (entrypoint, command, user,
stop signal, ports) mirrors deploy/docker/*.Dockerfile; `cargo test -p flotilla-tests --test e2e
images::` checks that the two agree. Layers are written deterministically (sorted names, time 0,
owner root), so the same binaries give the same image digest.

Usage (scripts/images.sh is the usual entry point):
  oci_image.py --bin-dir target/debug --pause PATH --out DIR [IMAGE...]
writes DIR/IMAGE/ (an OCI image layout) and DIR/IMAGE.tar (the same, as `ctr images import`
takes it) for each IMAGE of pause, operator, agent (default: all three).
"""

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NONROOT = 65532
# The user of the upstream pause image; the sandbox runs as it unless the pod says otherwise.
PAUSE_USER = 65535

# Image name -> what goes in. `binaries` are (source name in --bin-dir or a path, destination).
IMAGES = {
    "pause": {
        "ref": "flotilla.local/pause:1",
        "binaries": [("@pause", "/pause")],
        "entrypoint": ["/pause"],
        "cmd": None,
        "user": f"{PAUSE_USER}:{PAUSE_USER}",
        "stop_signal": None,
        "ports": [],
        "with_etc": False,
    },
    "operator": {
        "ref": "ghcr.io/flotilla-dev/flotilla-operator:0.1.0",
        "binaries": [("flotilla-operator", "/usr/local/bin/flotilla-operator")],
        "entrypoint": ["/usr/local/bin/flotilla-operator"],
        "cmd": ["run"],
        "user": f"{NONROOT}:{NONROOT}",
        "stop_signal": None,
        "ports": [7443, 9090],
        "with_etc": True,
    },
    "agent": {
        "ref": "ghcr.io/flotilla-dev/flotilla-agent:0.1.0",
        "binaries": [
            ("flotilla-agent", "/usr/local/bin/flotilla-agent"),
            ("flotilla-worker", "/usr/local/bin/flotilla-worker"),
            # The DaemonSet's init container hands the state directory to the agent's user.
            ("/bin/chown", "/bin/chown"),
            # Custom-command TrainingJobs run in this container (deploy/examples/trainingjob-command.yaml
            # uses these): debian-slim's shell is dash, and mkdir is not one of its builtins.
            ("/usr/bin/dash", "/bin/sh"),
            ("/bin/mkdir", "/bin/mkdir"),
        ],
        "entrypoint": ["/usr/local/bin/flotilla-agent"],
        "cmd": ["run"],
        "user": f"{NONROOT}:{NONROOT}",
        "stop_signal": "SIGINT",
        "ports": [9400],
        "with_etc": True,
    },
}

CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


class BuildError(Exception):
    pass


def linked_libraries(binary):
    """The shared libraries `binary` loads, as absolute paths (the dynamic loader included)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    text = out.stdout + out.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return []
    if out.returncode != 0:
        raise BuildError(f"ldd {binary}: exit {out.returncode}: {text.strip()}")
    libs = []
    for line in text.splitlines():
        line = line.strip()
        if "=> not found" in line:
            raise BuildError(f"{binary} links {line.split()[0]}, which this machine lacks")
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            libs.append(match.group(1))
    return libs


def etc_files():
    passwd = f"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n"
    group = f"root:x:0:\nnonroot:x:{NONROOT}:\n"
    files = {"/etc/passwd": passwd.encode(), "/etc/group": group.encode()}
    if os.path.exists(CA_BUNDLE):
        with open(CA_BUNDLE, "rb") as f:
            files[CA_BUNDLE] = f.read()
    return files


def layer_entries(spec, bin_dir, pause):
    """(destination path -> (bytes, mode)) for every file of the image."""
    entries = {}
    for source, dest in spec["binaries"]:
        if source == "@pause":
            path = pause
        elif source.startswith("/"):
            path = source
        else:
            path = os.path.join(bin_dir, source)
        if not os.path.isfile(path):
            raise BuildError(f"{dest}: expected the binary at {path}, found nothing (build it first)")
        with open(path, "rb") as f:
            entries[dest] = (f.read(), 0o755)
        for lib in linked_libraries(path):
            if lib not in entries:
                # The loader finds a library by the path ldd printed; store its content there.
                with open(os.path.realpath(lib), "rb") as f:
                    entries[lib] = (f.read(), 0o755)
    if spec["with_etc"]:
        for dest, data in etc_files().items():
            entries[dest] = (data, 0o644)
    return entries


def write_layer(entries, out):
    """An uncompressed, reproducible tar of `entries` (with parent directories and /tmp)."""
    dirs = {"tmp"}
    for dest in entries:
        parts = dest.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(dirs | {d.strip("/") for d in entries}):
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if name in dirs:
                info.type = tarfile.DIRTYPE
                info.mode = 0o1777 if name == "tmp" else 0o755
                tar.addfile(info)
            else:
                data, mode = entries["/" + name]
                info.size = len(data)
                info.mode = mode
                tar.addfile(info, io.BytesIO(data))


def write_blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return f"sha256:{digest}", len(data)


def input_key(spec, bin_dir, pause):
    """What an image is built from: this script, and each input's path, size and mtime."""
    key = hashlib.sha256()
    with open(__file__, "rb") as f:
        key.update(f.read())
    for source, dest in spec["binaries"]:
        path = pause if source == "@pause" else source if source.startswith("/") else os.path.join(bin_dir, source)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key.update(f"{dest} {path} {st.st_size} {st.st_mtime_ns}\n".encode())
    return key.hexdigest()


def build_image(name, spec, bin_dir, pause, out_dir):
    """Builds the image unless its archive was built from the same inputs (then reuses it)."""
    archive = os.path.join(out_dir, f"{name}.tar")
    key_file = os.path.join(out_dir, f"{name}.key")
    key = input_key(spec, bin_dir, pause)
    if key and os.path.exists(archive) and os.path.exists(key_file):
        with open(key_file) as f:
            if f.read().strip() == key:
                return spec["ref"], archive, layer_size_of(os.path.join(out_dir, name))
    layout = os.path.join(out_dir, name)
    shutil.rmtree(layout, ignore_errors=True)
    os.makedirs(os.path.join(layout, "blobs", "sha256"))

    layer = io.BytesIO()
    write_layer(layer_entries(spec, bin_dir, pause), layer)
    layer_digest, layer_size = write_blob(layout, layer.getvalue())

    config = {"Env": [PATH_ENV], "Entrypoint": spec["entrypoint"], "User": spec["user"], "WorkingDir": "/"}
    if spec["cmd"] is not None:
        config["Cmd"] = spec["cmd"]
    if spec["stop_signal"]:
        config["StopSignal"] = spec["stop_signal"]
    if spec["ports"]:
        config["ExposedPorts"] = {f"{p}/tcp": {} for p in spec["ports"]}
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "scripts/oci_image.py (Flotilla's local image build)"}],
    }
    config_digest, config_size = write_blob(layout, json.dumps(image_config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer_size,
            }
        ],
    }
    manifest_digest, manifest_size = write_blob(layout, json.dumps(manifest, sort_keys=True).encode())
    tag = spec["ref"].rsplit(":", 1)[1]
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "platform": {"architecture": "amd64", "os": "linux"},
                # containerd names the imported image after this annotation.
                "annotations": {
                    "io.containerd.image.name": spec["ref"],
                    "org.opencontainers.image.ref.name": tag,
                },
            }
        ],
    }
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f, sort_keys=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)

    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
    with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
        for root, _dirs, files in sorted(os.walk(layout)):
            for file in sorted(files):
                path = os.path.join(root, file)
                info = tar.gettarinfo(path, arcname=os.path.relpath(path, layout))
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                with open(path, "rb") as data:
                    tar.addfile(info, data)
    os.replace(tmp, archive)
    with open(key_file, "w") as f:
        f.write(f"{key}\n")
    return spec["ref"], archive, layer_size


def layer_size_of(layout):
    """The layer size recorded in an image layout's manifest."""
    with open(os.path.join(layout, "index.json")) as f:
        manifest_digest = json.load(f)["manifests"][0]["digest"].split(":", 1)[1]
    with open(os.path.join(layout, "blobs", "sha256", manifest_digest)) as f:
        return json.load(f)["layers"][0]["size"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", required=True, help="directory holding the workspace's built binaries")
    parser.add_argument("--pause", required=True, help="the static pause binary (tests/controlplane/build.sh builds it)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("images", nargs="*", help=f"images to build (default: {' '.join(IMAGES)})")
    args = parser.parse_args()
    names = args.images or list(IMAGES)
    for name in names:
        if name not in IMAGES:
            parser.error(f"unknown image {name!r}: expected one of {', '.join(IMAGES)}")
    os.makedirs(args.out, exist_ok=True)
    try:
        for name in names:
            ref, archive, size = build_image(name, IMAGES[name], args.bin_dir, args.pause, args.out)
            # One line per image: what scripts/images.sh imports and reports.
            print(f"{ref} {archive} {size}")
    except BuildError as err:
        print(f"oci_image.py: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
