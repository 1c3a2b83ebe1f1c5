# JupyterLab with xraylib and its notebooks, CPU PyTorch.
#   docker build -t xraylib .
#   docker run -p 8888:8888 xraylib                       # JupyterLab; open the URL with the token it prints
#   docker run -e AWS_PROFILE -v ~/.aws:/home/xray/.aws:ro xraylib \
#       xraylib run train -p data s3://BUCKET/chest_xray -p out s3://BUCKET/runs/resnet50
FROM python:3.11.9-slim-bookworm

# The same torch build the Makefile installs, from PyTorch's CPU-only index (no CUDA libraries).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_PACKAGES="torch==2.14.1 torchvision==0.29.1"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "$TORCH_INDEX_URL" $TORCH_PACKAGES

WORKDIR /app
COPY pyproject.toml README.md ./
COPY xraylib ./xraylib
RUN pip install . && python -c "import xraylib.cli, xraylib.notebooks"
COPY notebooks ./notebooks

RUN useradd --create-home --uid 1000 xray && chown -R xray /app
USER xray

EXPOSE 8888
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "--ServerApp.root_dir=/app/notebooks"]
