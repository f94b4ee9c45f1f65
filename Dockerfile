# The actmap image: the workers (`docker compose up --scale worker=N`; obstore for ACTMAP_S3_CLIENT=obstore)
# and Flower (the `flower` service).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir ".[flower,obstore]" && useradd --create-home actmap
USER actmap
ENTRYPOINT ["actmap"]
CMD ["worker", "--concurrency", "2"]
