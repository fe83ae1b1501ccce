# Ballast node image: the statically linked `ballastd` and `ballast`, nothing else.
#
# Build it with scripts/build-image.sh (it builds the static binaries on the host
# with `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release
# --target x86_64-unknown-linux-gnu --bins`, then runs `docker build -t ballast:dev`).
# No base image is pulled: the binaries need no libc, loader or shell.
#
#   docker run -d --name ballast -p 127.0.0.1:10809:10809 -p 127.0.0.1:7800:7800 ballast:dev
#   docker exec ballast ballast volume create vol1 --size 10G
#   nbdinfo nbd://127.0.0.1:10809/vol1
#
# The pool lives in the volume /var/lib/ballast: with no --disk, ballastd makes a
# 16 GiB sparse file there on first start. To pool a real disk, pass it through
# and name it, e.g. `--device /dev/nvme1n1 ballast:dev --disk /dev/nvme1n1`
# (extra arguments are appended to the ENTRYPOINT's).
#
# I/O backend and seccomp: Docker's default seccomp profile blocks io_uring
# (io_uring_setup, io_uring_enter, io_uring_register are denied by the default
# profile of Docker Engine 25.0 and later; older engines, such as Debian 12's
# docker.io 20.10, still allowed them). When io_uring is blocked, ballastd's
# default `--io-backend auto` logs one warning ("io_uring is unavailable, using
# the thread-pool I/O backend instead") and the thread-pool fallback backend
# serves every request: correct and durable, somewhat slower. To let it use
# io_uring, run the container with `--security-opt seccomp=unconfined`, or with
# a seccomp profile that allows io_uring_setup, io_uring_enter and
# io_uring_register (`--security-opt seccomp=/path/to/profile.json`).
# `ballast node info` shows the backend in use ("IO backend: io_uring" or
# "threads"); `--io-backend threads` chooses the fallback explicitly.
FROM scratch

COPY target/x86_64-unknown-linux-gnu/release/ballastd /usr/bin/ballastd
COPY target/x86_64-unknown-linux-gnu/release/ballast /usr/bin/ballast

VOLUME /var/lib/ballast
# NBD, gRPC control API
EXPOSE 10809 7800

# The CLI inside the container talks to the local API by default.
ENV BALLAST_API=http://127.0.0.1:7800

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/bin/ballast", "--api", "http://127.0.0.1:7800", "node", "info"]

# Docker sends SIGTERM on `docker stop`: ballastd finishes in-flight requests,
# flushes and exits 0. Give it time: `docker stop -t 60`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/ballastd", "--data", "/var/lib/ballast", "--listen-nbd", "0.0.0.0:10809", "--listen-api", "0.0.0.0:7800"]
