# medq worker / flower / CLI image.
#
#   docker build -t medq .
#   docker run --rm -e MEDQ_REDIS_URL=redis://:PASSWORD@redis-host:6379/0 medq            # a worker
#   docker run --rm medq medq schemas list                                                # any medq command
#
# docker-compose.yml next to this file runs the whole stack (Redis, Ollama, workers, Flower).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# A fixed numeric uid so orchestrators can check runAsNonRoot and volume
# permissions are predictable.
RUN groupadd --system --gid 10001 medq \
    && useradd --system --uid 10001 --gid medq --create-home --home-dir /home/medq medq

WORKDIR /app

# Dependencies first, in their own layer, so editing the code does not
# re-download celery, openai, psycopg, ... on every build.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (configs/ included: medq finds /app/configs from WORKDIR).
# Files stay owned by root, so the running process cannot modify its own code.
COPY . .
RUN pip install --no-cache-dir -e .

USER 10001:10001

# Default: a Celery worker (`medq worker`); compose overrides this for Flower.
CMD ["medq", "worker"]
