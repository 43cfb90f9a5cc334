# HIE FHIR server: slim, non-root, with a healthcheck.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hie ./hie
COPY conformance ./conformance
COPY terminology ./terminology
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/hie hie
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER hie
WORKDIR /var/lib/hie
ENV HIE_DATA_DIR=/var/lib/hie \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/hie"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["hie", "serve", "--host", "0.0.0.0", "--port", "8080"]
