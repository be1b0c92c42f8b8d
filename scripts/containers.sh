#!/usr/bin/env bash
# A container engine and broker images for switchyard's container tests, on
# a machine without Docker and without an image registry (podman + runc from
# Debian, images built from what is installed here).
#
#   bash scripts/containers.sh start    # install, start the Docker-API service, build images
#   bash scripts/containers.sh stop     # stop the API service this script started (by PID)
#   source scripts/containers.sh; containers_start   # same, and exports DOCKER_HOST and
#                                                    # SWITCHYARD_{NATS,RABBITMQ,KAFKA,SQS}_IMAGE
#
# On a machine with Docker none of this is needed: switchyard-testing pulls
# the brokers' official images (see docs/CONTAINERS.md).
#
# podman needs two settings here (see BROKERS.md): runc as the runtime (crun
# refuses cgroups in hybrid mode) and lower default rlimits. They live in a
# containers.conf of our own (CONTAINERS_CONF), not in /etc.
#
# Images are built from the brokers installed on this machine (by
# scripts/brokers.sh): the broker's files plus every shared library their
# ELF files need, `podman import`ed. Each image's tag is a hash of its
# contents' list (paths, sizes, times), so a second run reuses it in seconds.

SY_CONTAINER_DIR="${SWITCHYARD_CONTAINER_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/switchyard/containers}"
SY_CONTAINERS_SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

_sy_c_log() { echo "[containers] $*" >&2; }

_sy_podman() { CONTAINERS_CONF="$SY_CONTAINER_DIR/containers.conf" podman "$@"; }

_sy_c_install() {
    if command -v podman >/dev/null && command -v runc >/dev/null; then
        return 0
    fi
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    _sy_c_log "installing podman and runc (Debian packages, about a minute)"
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q podman runc >/dev/null 2>&1; then
        $sudo apt-get update -qq >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q podman runc >/dev/null
    fi
}

_sy_c_config() {
    mkdir -p "$SY_CONTAINER_DIR"
    cat >"$SY_CONTAINER_DIR/containers.conf" <<'EOF'
# Written by switchyard's scripts/containers.sh.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
EOF
}

_sy_c_api_answers() { # socket path
    [ -S "$1" ] && curl -sf --max-time 5 --unix-socket "$1" http://d/_ping >/dev/null 2>&1
}

_sy_c_start_service() {
    local sock="$SY_CONTAINER_DIR/podman.sock"
    export DOCKER_HOST="unix://$sock"
    if _sy_c_api_answers "$sock"; then
        _sy_c_log "reusing the Docker-API service at $sock"
        return 0
    fi
    rm -f "$sock"
    _sy_c_log "starting podman's Docker-API service at $sock"
    CONTAINERS_CONF="$SY_CONTAINER_DIR/containers.conf" setsid podman system service --time=0 \
        "unix://$sock" </dev/null >"$SY_CONTAINER_DIR/service.log" 2>&1 &
    echo $! >"$SY_CONTAINER_DIR/service.pid"
    SY_STARTED_CONTAINER_SERVICE=1
    local deadline=$((SECONDS + 30))
    until _sy_c_api_answers "$sock"; do
        ((SECONDS < deadline)) || { _sy_c_log "the API service does not answer (see $SY_CONTAINER_DIR/service.log)"; return 1; }
        sleep 0.2
    done
}

# Prints the files under the given paths, then the shared libraries (and
# their real paths) that the ELF files among them need, and the loader.
_sy_c_closure() { # path...
    find "$@" \( -type f -o -type l \) -print
    find "$@" -type f \( -perm -u+x -o -name '*.so' -o -name '*.so.*' \) -print0 |
        xargs -0 -r ldd 2>/dev/null |
        awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' |
        sort -u | while read -r lib; do
            echo "$lib"
            readlink -f "$lib"
        done
    echo /lib64/ld-linux-x86-64.so.2
    readlink -f /lib64/ld-linux-x86-64.so.2
}

# Builds image NAME from a list of host files (stdin) unless an image with
# the same contents exists; prints its reference. Extra files for the image
# (a config, a script) come from the staging directory DIR's `extra/`.
_sy_c_image() { # name dir change...
    local name="$1" dir="$2"
    shift 2
    local list="$dir/files"
    sort -u >"$list"
    local hash
    hash="$(
        {
            xargs -d '\n' -r stat -c '%n %s %Y' <"$list" 2>/dev/null
            (cd "$dir/extra" && find . -type f -exec sha256sum {} +) | sort
            printf '%s\n' "$@"
        } | sha256sum | cut -c1-16
    )"
    local ref="localhost/switchyard/$name:$hash"
    if _sy_podman image exists "$ref" 2>/dev/null; then
        _sy_c_log "image $ref: up to date"
        echo "$ref"
        return 0
    fi
    _sy_c_log "image $ref: building from $(wc -l <"$list") files of this machine"
    local root="$dir/root"
    rm -rf "$root"
    mkdir -p "$root/usr/bin" "$root/usr/lib" "$root/usr/lib64" "$root/usr/sbin" "$root/tmp" "$root/etc"
    chmod 1777 "$root/tmp"
    # Debian 12's merged /usr: /bin, /lib, /lib64 and /sbin are links.
    ln -s usr/bin "$root/bin"
    ln -s usr/lib "$root/lib"
    ln -s usr/lib64 "$root/lib64"
    ln -s usr/sbin "$root/sbin"
    tar -C / -cf - --no-recursion -T <(sed 's|^/||' "$list") 2>/dev/null |
        tar -C "$root" -xf - --keep-directory-symlink
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
    cp -a "$dir/extra/." "$root/"
    local changes=()
    local c
    for c in "$@"; do changes+=(--change "$c"); done
    tar -C "$root" -cf - . | _sy_podman import -q "${changes[@]}" - "$ref" >/dev/null || return 1
    rm -rf "$root"
    # Earlier builds of this image are of no more use.
    _sy_podman images --format '{{.Repository}}:{{.Tag}}' "localhost/switchyard/$name" 2>/dev/null |
        grep -vx "$ref" | xargs -r env CONTAINERS_CONF="$SY_CONTAINER_DIR/containers.conf" podman rmi -f >/dev/null 2>&1 || true
    echo "$ref"
}

_sy_c_build_nats() {
    local dir="$SY_CONTAINER_DIR/build/nats" bin
    bin="$(command -v nats-server || echo /usr/sbin/nats-server)"
    [ -x "$bin" ] || { _sy_c_log "nats-server is not installed (run scripts/brokers.sh start nats)"; return 1; }
    rm -rf "$dir" && mkdir -p "$dir/extra/data"
    _sy_c_closure "$bin" | _sy_c_image nats "$dir" \
        "ENTRYPOINT [\"$bin\"]" 'CMD ["-js", "-sd", "/data"]' 'EXPOSE 4222'
}

_sy_c_build_kafka() {
    local dir="$SY_CONTAINER_DIR/build/kafka" bin
    bin="$(command -v tansu || true)"
    [ -n "$bin" ] || { _sy_c_log "tansu is not installed (run scripts/brokers.sh start kafka)"; return 1; }
    rm -rf "$dir" && mkdir -p "$dir/extra/data"
    # tansu reads its settings from the environment too (ADVERTISED_LISTENER_URL
    # is set per container by switchyard-testing, which chooses the host port).
    _sy_c_closure "$bin" | _sy_c_image kafka "$dir" \
        "ENTRYPOINT [\"$bin\"]" \
        'CMD ["broker", "--listener-url", "tcp://0.0.0.0:9092", "--storage-engine", "sqlite://tansu.db"]' \
        'WORKDIR /data' 'EXPOSE 9092'
}

_sy_c_build_rabbitmq() {
    local dir="$SY_CONTAINER_DIR/build/rabbitmq"
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] ||
        { _sy_c_log "rabbitmq-server is not installed (run scripts/brokers.sh start rabbitmq)"; return 1; }
    rm -rf "$dir" && mkdir -p "$dir/extra/etc/rabbitmq" "$dir/extra/var/lib/rabbitmq" "$dir/extra/var/log/rabbitmq"
    # As the official image: listen on every interface of the container, let
    # guest log in from outside it, log to the console.
    cat >"$dir/extra/etc/rabbitmq/rabbitmq.conf" <<'EOF'
listeners.tcp.default = 5672
loopback_users = none
log.console = true
log.console.level = info
log.file = false
EOF
    echo '[].' >"$dir/extra/etc/rabbitmq/enabled_plugins"
    # The server's scripts run under /bin/sh and call a few coreutils.
    local tools=() t
    for t in sh dash env dirname basename readlink sed grep cat mkdir rm id uname hostname awk mawk head tr cut; do
        t="$(command -v "$t" || true)"
        [ -n "$t" ] && tools+=("$t" "$(readlink -f "$t")")
    done
    _sy_c_closure /usr/lib/rabbitmq /usr/lib/erlang /usr/bin/erl /usr/bin/epmd /usr/bin/escript "${tools[@]}" | _sy_c_image rabbitmq "$dir" \
        'ENTRYPOINT ["/usr/lib/rabbitmq/bin/rabbitmq-server"]' \
        'ENV HOME=/var/lib/rabbitmq' 'ENV RABBITMQ_NODENAME=rabbit@localhost' \
        'ENV RABBITMQ_ALLOW_INPUT=1' 'ENV RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-noinput' \
        'ENV RABBITMQ_MNESIA_BASE=/var/lib/rabbitmq/mnesia' 'ENV RABBITMQ_LOG_BASE=/var/log/rabbitmq' \
        'ENV RABBITMQ_CONFIG_FILE=/etc/rabbitmq/rabbitmq.conf' \
        'ENV RABBITMQ_ENABLED_PLUGINS_FILE=/etc/rabbitmq/enabled_plugins' \
        'ENV PATH=/usr/lib/rabbitmq/bin:/usr/lib/erlang/bin:/usr/bin' \
        'EXPOSE 5672'
}

_sy_c_build_sqs() {
    local dir="$SY_CONTAINER_DIR/build/sqs"
    rm -rf "$dir" && mkdir -p "$dir/extra"
    cp "$SY_CONTAINERS_SCRIPT_DIR/moto_server.py" "$dir/extra/moto_server.py"
    # The interpreter, its standard library (without tests and GUI kits) and
    # the distributions moto's server needs for SQS and SNS (its core
    # requirements, flask and flask-cors), found through their metadata.
    local python paths
    python="$(python3 -c 'import sys; print(sys.executable)')"
    paths="$(
        python3 - <<'EOF'
import importlib.metadata as md, os, re, sys, sysconfig
stdlib = sysconfig.get_paths()["stdlib"]
skip = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages", "__pycache__"}
print(os.path.realpath(sys.executable))
print(sys.executable)
for entry in os.listdir(stdlib):
    if entry not in skip:
        print(os.path.join(stdlib, entry))
libdir = sysconfig.get_config_var("LIBDIR")
ldlib = sysconfig.get_config_var("LDLIBRARY")
if libdir and ldlib and os.path.exists(os.path.join(libdir, ldlib)):
    print(os.path.join(libdir, ldlib))
seen, todo = set(), ["moto", "flask", "flask-cors"]
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen:
        continue
    seen.add(name)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    for f in dist.files or []:
        print(os.path.realpath(dist.locate_file(f)))
    for req in dist.requires or []:
        if "extra ==" in req:
            continue
        todo.append(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
EOF
    )" || return 1
    # shellcheck disable=SC2086 # one path per line, no spaces in them
    printf '%s\n' $paths | while read -r p; do [ -e "$p" ] && echo "$p"; done >"$dir/paths"
    xargs -d '\n' -a "$dir/paths" sh -c 'for p; do if [ -d "$p" ]; then find "$p" \( -type f -o -type l \) -not -path "*/__pycache__/*"; else echo "$p"; fi; done' sh >"$dir/py-files"
    {
        cat "$dir/py-files"
        grep -E '(/bin/python[0-9.]*|\.so(\.[0-9.]+)?)$' "$dir/py-files" | xargs -d '\n' -r ldd 2>/dev/null |
            awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u | while read -r lib; do
                echo "$lib"
                readlink -f "$lib"
            done
        echo /lib64/ld-linux-x86-64.so.2
        readlink -f /lib64/ld-linux-x86-64.so.2
    } | _sy_c_image sqs "$dir" \
        "ENTRYPOINT [\"$python\", \"/moto_server.py\"]" 'CMD ["-H", "0.0.0.0", "-p", "5000"]' \
        'ENV PYTHONDONTWRITEBYTECODE=1' 'EXPOSE 5000'
}

containers_start() { # [broker...]: images to build (default: all four)
    _sy_c_install || return 1
    _sy_c_config
    # podman commands of the tests (a watchdog's `podman rm`) use it too.
    export CONTAINERS_CONF="$SY_CONTAINER_DIR/containers.conf"
    _sy_c_start_service || return 1
    local b ref
    for b in ${*:-nats rabbitmq kafka sqs}; do
        case "$b" in
        nats) ref="$(_sy_c_build_nats)" && export SWITCHYARD_NATS_IMAGE="$ref" ;;
        rabbitmq) ref="$(_sy_c_build_rabbitmq)" && export SWITCHYARD_RABBITMQ_IMAGE="$ref" ;;
        kafka) ref="$(_sy_c_build_kafka)" && export SWITCHYARD_KAFKA_IMAGE="$ref" ;;
        sqs) ref="$(_sy_c_build_sqs)" && export SWITCHYARD_SQS_IMAGE="$ref" ;;
        *) _sy_c_log "unknown broker $b (known: nats rabbitmq kafka sqs)"; return 1 ;;
        esac || { _sy_c_log "building the $b image failed"; return 1; }
    done
}

containers_remove_all() { # every container switchyard-testing started here
    _sy_podman ps -aq --filter label=org.switchyard.testing.pid 2>/dev/null |
        xargs -r env CONTAINERS_CONF="$SY_CONTAINER_DIR/containers.conf" podman rm -f >/dev/null 2>&1 || true
}

containers_stop() { # the API service, when this script started it
    local f="$SY_CONTAINER_DIR/service.pid" pid
    [ -e "$f" ] || return 0
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
        _sy_c_log "stopping the API service (pid $pid)"
        kill "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    cmd="${1:-start}"
    shift || true
    case "$cmd" in
    start) containers_start "$@"; env | grep -E '^(DOCKER_HOST|SWITCHYARD_.*_IMAGE)=' || true ;;
    stop) containers_stop ;;
    *) echo "usage: $0 start|stop [broker...]" >&2; exit 2 ;;
    esac
fi
