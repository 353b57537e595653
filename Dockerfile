# The Kernelflow worker (and the LLM simulator): `docker build -t kernelflow .`
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin kernelflow

WORKDIR /tmp/kernelflow-src
COPY pyproject.toml README.md ./
COPY kernelflow/ kernelflow/
COPY kernel/ kernel/
COPY providers/ providers/
COPY brokers/ brokers/
COPY activities/ activities/
COPY workflows/ workflows/
COPY worker/ worker/
COPY simulator/ simulator/
RUN pip install . && cd / && rm -rf /tmp/kernelflow-src \
    && mkdir -p /var/lib/kernelflow/payloads /var/lib/kernelflow/keys \
    && chown kernelflow /var/lib/kernelflow/payloads /var/lib/kernelflow/keys && chmod 700 /var/lib/kernelflow/keys

USER kernelflow
WORKDIR /home/kernelflow
ENV TEMPORAL_ADDRESS=temporal:7233 \
    TEMPORAL_NAMESPACE=default \
    KERNELFLOW_TASK_QUEUE=kernelflow

CMD ["kernelflow", "worker"]
