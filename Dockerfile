# nemo_jstip on an NGC NeMo image: PyTorch, Transformer Engine, apex and megatron-core come from the image and
# are never replaced; nemo_toolkit[asr], lhotse and the plugin are installed on top. See docs/docker.md.
ARG BASE_IMAGE=nvcr.io/nvidia/nemo:26.10
FROM ${BASE_IMAGE}

RUN apt-get update && apt-get install -y --no-install-recommends espeak-ng && rm -rf /var/lib/apt/lists/*

# Freeze what the image ships so pip can only add packages around it.
RUN pip list --format=freeze 2>/dev/null \
    | grep -iE '^(torch|torchvision|torchaudio|transformer[-_]engine[-_a-z0-9]*|apex|megatron[-_]core|triton|flash[-_]attn|numpy|nvidia-[-_a-z0-9]+)==' \
    > /opt/image-constraints.txt && cat /opt/image-constraints.txt

WORKDIR /workspace/nemo_jstip
COPY . .
RUN pip install --no-cache-dir -c /opt/image-constraints.txt -e '.[test]'
# Report (not fail on) conflicts the base image may already carry.
RUN pip check || echo "pip check found conflicts (see above)"

RUN python -c "import torch, transformer_engine, megatron.core, nemo.collections.asr, lhotse, nemo_jstip; \
print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| nemo_jstip', nemo_jstip.__version__)"
