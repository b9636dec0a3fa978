#!/usr/bin/env bash
# Build loramux's images: the operator and the CPU inference image (`make images`).
#
# Works with docker when a Docker engine answers, otherwise with podman, and with no
# container registry at all:
#   - podman, buildah, runc and mmdebstrap are installed from Debian packages when podman is
#     missing (as root, or with sudo);
#   - the base image (PYTHON_IMAGE, default python:3.11-slim-bookworm) is pulled when it can
#     be; otherwise a Debian bookworm base with Python 3.11 is bootstrapped from Debian
#     packages with mmdebstrap, once, and cached as a tarball in $CACHE;
#   - podman runs with runc, cgroupfs and host networking (containers.conf written to $CACHE),
#     and the host's CA bundle is mounted into build steps so that pip reaches PyPI;
#   - a local directory of wheels that holds the CPU torch wheel (pip's find-links) is
#     mounted into the build, for machines that cannot reach the PyTorch index.
#
# Environment: IMAGES ("operator inference-cpu"), LORAMUX_IMAGE_TAG (dev), PYTHON_IMAGE,
# LORAMUX_IMAGE_CACHE ($LORAMUX_CACHE_DIR/images, default ~/.cache/loramux/images),
# CONTAINER_ENGINE (docker|podman).
# Prints one line per image: name, size in bytes, build seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGES=${IMAGES:-"operator inference-cpu"}
TAG=${LORAMUX_IMAGE_TAG:-dev}
CACHE=${LORAMUX_IMAGE_CACHE:-${LORAMUX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/loramux}/images}
DEFAULT_BASE=python:3.11-slim-bookworm
BOOTSTRAP_BASE=localhost/debian-python:bookworm
mkdir -p "$CACHE"
log() { echo "[images] $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

engine=${CONTAINER_ENGINE:-}
if [ -z "$engine" ]; then
  if command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then
    engine=docker
  else
    engine=podman
  fi
fi
if [ "$engine" = podman ]; then
  if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null \
      || ! command -v runc >/dev/null; then
    log "installing podman, buildah, runc and mmdebstrap from Debian packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      podman buildah runc mmdebstrap >/dev/null
  fi
  # crun refuses hybrid cgroups on these machines; host networking; limits the host allows.
  conf="$CACHE/containers.conf"
  cat > "$conf" <<CONF
[containers]
netns = "host"
volumes = ["/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro"]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
  export CONTAINERS_CONF="$conf"
fi

base=${PYTHON_IMAGE:-$DEFAULT_BASE}
have_image() { "$engine" image inspect "$1" >/dev/null 2>&1; }
if ! have_image "$base"; then
  if [ "$engine" = podman ] && [ "$base" = "$DEFAULT_BASE" ]; then
    pull_ref="docker.io/library/$base"
  else
    pull_ref="$base"
  fi
  if timeout 60 "$engine" pull -q "$pull_ref" >/dev/null 2>&1; then
    log "pulled $pull_ref"
    base=$pull_ref
  elif [ "$engine" = podman ]; then
    base=$BOOTSTRAP_BASE
    if ! have_image "$base"; then
      tarball="$CACHE/debian-python-bookworm.tar"
      if [ ! -f "$tarball" ] || [ ! -s "$tarball" ]; then
        rm -rf "$tarball" "$tarball.partial"
        log "no registry: bootstrapping $base from Debian packages (mmdebstrap, ~1 min)"
        as_root mmdebstrap --quiet --variant=minbase --format=tar \
          --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
          bookworm "$tarball.partial"
        rm -rf "$tarball" && mv "$tarball.partial" "$tarball"
      fi
      podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        "$tarball" "$base" >/dev/null
      log "imported $base from $tarball"
    fi
  else
    log "cannot pull $pull_ref; set PYTHON_IMAGE to a base image this engine has"
    exit 1
  fi
fi

# The CPU torch wheel: from the local wheel directory pip already uses, when it has one.
torch_args=()
links=${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}
for dir in $links; do
  if compgen -G "$dir/torch-*.whl" >/dev/null; then
    torch_args=(--volume "$dir:$dir:ro" --build-arg "TORCH_FIND_LINKS=$dir"
                --build-arg "TORCH_INDEX_URL=https://pypi.org/simple")
    log "torch wheel from $dir"
    break
  fi
done

for image in $IMAGES; do
  dockerfile="docker/Dockerfile.$image"
  [ -f "$dockerfile" ] || { log "no $dockerfile"; exit 1; }
  ref="loramux/$image:$TAG"
  args=(build -f "$dockerfile" -t "$ref" --build-arg "PYTHON_IMAGE=$base")
  if [ "$engine" = podman ]; then
    args+=(--ignorefile "$dockerfile.dockerignore" --network host)
    [ "$image" = inference-cpu ] && args+=("${torch_args[@]}")
  fi
  log "building $ref with $engine (base $base)"
  started=$(date +%s)
  "$engine" "${args[@]}" . >&2
  seconds=$(( $(date +%s) - started ))
  size=$("$engine" image inspect --format '{{.Size}}' "$ref")
  echo "$ref $size $seconds"
done
