# One image for every Trellis server process; the argument picks the process:
#
#   docker build -t trellis:0.1.0 .
#   docker run --rm -p 7400:7400 trellis:0.1.0                  # coordinator serve (SQLite in /var/lib/trellis)
#   docker run --rm -p 8080:8080 -e TRELLIS_GATEWAY_COORDINATOR_ADDRESS=coordinator:7400 \
#     trellis:0.1.0 gateway serve
#   docker run --rm -e TRELLIS_DATABASE_URL=postgresql://... trellis:0.1.0 migrate
#
# Stage 1 builds the trellis wheel and installs it, with the [coordinator,gateway] extras, into
# a virtualenv (/opt/trellis). Stage 2 copies only that virtualenv onto a clean slim base: no
# compiler, no build backend, no source tree. Every dependency ships manylinux wheels, so
# neither stage needs build tools. docs/deployment.md describes the image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# .dockerignore keeps the context to what the wheel is built from.
COPY . .
# pip compiles the bytecode at install: the runtime's root filesystem is read-only.
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv --without-pip /opt/trellis \
 && set -- /dist/trellis-*.whl \
 && python -m pip --python /opt/trellis/bin/python install "$1[coordinator,gateway]" \
 && /opt/trellis/bin/trellis --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="trellis" \
      org.opencontainers.image.description="Trellis workflow coordinator, gateway and migrations" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed, non-root uid/gid: the Helm chart's runAsUser/fsGroup (10001) match it.
RUN groupadd --system --gid 10001 trellis \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/trellis --create-home \
      --shell /usr/sbin/nologin trellis
COPY --from=build /opt/trellis /opt/trellis
# Listen on every interface inside the container. The coordinator refuses TRELLIS_* names it
# does not know but ignores TRELLIS_GATEWAY_*, and the gateway reads only TRELLIS_GATEWAY_*, so
# both variables are safe for every process of the image.
ENV PATH=/opt/trellis/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TRELLIS_LISTEN=0.0.0.0:7400 \
    TRELLIS_GATEWAY_LISTEN=0.0.0.0:8080
USER 10001:10001
WORKDIR /var/lib/trellis
# 7400: coordinator gRPC (and the gRPC health service); 8080: gateway HTTP (/healthz, /readyz).
EXPOSE 7400 8080
ENTRYPOINT ["trellis"]
CMD ["coordinator", "serve"]
