# syntax=docker/dockerfile:1
#
# eventsched application image: one image, three roles.
#   docker build -t eventsched:local .
#   docker run --rm eventsched:local run --role consumer
#
# Stage 1 builds a virtualenv with the package and its runtime dependencies
# only (no dev extras), pinned by constraints.txt. Stage 2 copies that
# virtualenv into a clean slim image and runs as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
RUN python -m venv "$VIRTUAL_ENV"

# Dependencies first, from pyproject.toml alone: this layer stays cached while
# only the application code changes.
COPY pyproject.toml constraints.txt ./
# The profiling extra too: compose enables Pyroscope.
RUN python -c "import subprocess, sys, tomllib; \
project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
deps = project['dependencies'] + project['optional-dependencies']['profiling']; \
subprocess.check_call([sys.executable, '-m', 'pip', 'install', '--constraint', 'constraints.txt', *deps])"

# Then the package itself (non-editable, no dependency resolution left to do).
COPY README.md LICENSE ./
COPY eventsched ./eventsched
COPY sql ./sql
COPY config ./config
RUN pip install --no-deps --constraint constraints.txt . \
    && python -c "import eventsched"


FROM ${PYTHON_IMAGE} AS runtime

# The commit the image is built from, for eventsched_build_info{commit}:
#   docker build --build-arg EVENTSCHED_BUILD_COMMIT=$(git rev-parse --short HEAD) .
ARG EVENTSCHED_BUILD_COMMIT=unknown

LABEL org.opencontainers.image.title="eventsched" \
      org.opencontainers.image.description="Deferred-event scheduler: Kafka in, PostgreSQL log, on-time execution with SAQ on Redis" \
      org.opencontainers.image.licenses="Apache-2.0"

# The package is installed into site-packages, away from the repository
# layout, so tell it where its settings file and migrations are.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    EVENTSCHED_ENV=production \
    EVENTSCHED_SETTINGS=/app/config/settings.toml \
    EVENTSCHED_SQL_DIR=/app/sql \
    EVENTSCHED_BUILD_COMMIT=${EVENTSCHED_BUILD_COMMIT}

RUN groupadd --system --gid 10001 eventsched \
    && useradd --system --uid 10001 --gid eventsched --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin eventsched

WORKDIR /app
COPY --from=build /opt/venv /opt/venv
# Owned by root and read-only for the app user: the code cannot rewrite its
# own migrations or settings.
COPY sql ./sql
COPY config ./config

USER 10001:10001

# producer, consumer, executor, api (/metrics, /healthz, /readyz); the HTTP API.
EXPOSE 8080 8081 8082 8085 8084

# `python -m eventsched` is the same entry as the `eventsched` console script;
# compose passes the subcommand, e.g. command: ["run", "--role", "consumer"].
ENTRYPOINT ["python", "-m", "eventsched"]
CMD ["run", "--role", "all"]
