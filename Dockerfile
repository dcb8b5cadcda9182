# Trainer image for H100 clusters: NGC PyTorch (CUDA, NCCL, Transformer Engine, apex, Python 3.12) plus
# megatron_m2po with the [trainer] extra. The rollout nodes run SGLang in their own image (Dockerfile.rollout):
# sglang 0.5.23 pins torch==2.14.1 / transformers==5.19.0, which no NGC image with Transformer Engine matches.
#
#   docker build -t megatron_m2po .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v $PWD/runs:/workspace/megatron_m2po/runs megatron_m2po \
#       torchrun --nproc-per-node 8 -m megatron_m2po train --config examples/<model>/<recipe>.yaml
#
# The NGC release pins torch/TE/apex built together; the constraints below keep that stack. In examples/common/
# node.sh the trainer runs under TRAINER_PYTHON (this image), the servers under ROLLOUT_PYTHON (the other).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.08-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    NCCL_NVLS_ENABLE=0

WORKDIR /workspace/megatron_m2po
COPY setup.py pyproject.toml README.md ./
COPY megatron_m2po ./megatron_m2po
COPY tools ./tools
COPY examples ./examples
COPY bench ./bench
COPY tests ./tests
COPY docs ./docs

# Keep the image's torch / Transformer Engine / apex: record their versions as constraints so that a
# dependency asking for another build fails the image build instead of silently swapping the CUDA stack.
RUN python -m pip list --format=freeze | grep -iE '^(torch|transformer[-_]engine|apex|flash[-_]attn)==' \
        > /tmp/ngc-constraints.txt \
    && PIP_CONSTRAINT=/tmp/ngc-constraints.txt python -m pip install -e ".[trainer]" \
    && python -m pip install pytest hypothesis

# Fail the build if the GPU path is broken: Transformer Engine layer spec + Megatron-core import.
RUN python -c "import transformer_engine.pytorch, megatron.core, megatron_m2po.platform as p; print('ok', megatron.core.__version__)"

# GPU tests (needs a GPU at run time):  docker run --gpus all megatron_m2po python -m pytest -q -m gpu tests/test_gpu.py
CMD ["m2po", "--help"]
